"""``attach_edge_noise``: one learned std per edge of the model's graph, and reading it back.

>>> from tl_noise.models import load_embedded_model
>>> model = load_embedded_model()
>>> noise = attach_edge_noise(model)
>>> noise.graph.n_edges, len(edge_importance(noise))
(81, 81)
>>> list(edge_importance(noise))[:2]
['input->a0.h0<q>', 'input->a0.h1<q>']
>>> noise.remove()
"""

from __future__ import annotations

import copy
from typing import Any

from jaxtyping import Int
from torch import Tensor

from tl_noise.devices import model_device
from tl_noise.edges.graph import EdgeGraph
from tl_noise.edges.noise import EdgeNoise
from tl_noise.edges.refine import refined_scores
from tl_noise.edges.weights import check_edge_model
from tl_noise.errors import TLNoiseTypeError
from tl_noise.hooks.attach import check_noise_arguments
from tl_noise.hooks.calibration import default_probe_tokens
from tl_noise.hooks.noise_hooks import NoiseHooks
from tl_noise.hooks.selection import check_tokens
from tl_noise.noise.forms import check_form
from tl_noise.noise.layer import NoiseLayer
from tl_noise.noise.parameterizations import StandardDeviationParameterization


def attach_edge_noise(
    model: Any,
    calibration_tokens: Int[Tensor, "n pos"] | None = None,
    form: str = "replacement",
    init_std: float = 0.05,
    parameterization: StandardDeviationParameterization | None = None,
    seed: int | None = 0,
) -> EdgeNoise:
    """Put one learnable std on every writer -> reader edge of ``model`` (see
    :mod:`tl_noise.edges.noise`) and return the attached :class:`EdgeNoise`.

    Args:
        model: a TransformerLens 4.x ``TransformerBridge`` (booted natively or from a Hugging
            Face checkpoint) or 3.x ``HookedTransformer``, with or without layer norm.
        calibration_tokens: ``[n, pos]`` tokens on which each writer's mean and std are measured
            (default: random tokens; :func:`tl_noise.fit` then recalibrates on its data).
        form: ``"replacement"`` (an edge at ``sigma = 1`` is resampled from its writer's
            Gaussian; the default) or ``"additive"``.
        init_std, parameterization, seed: as for :func:`tl_noise.attach_noise` (Cloak
            ``(1e-4, 1)`` by default; ``(1e-4, 2)`` when additive).

    Rotary, ALiBi, grouped key/value heads and parallel attention/MLP blocks are rebuilt
    (:mod:`tl_noise.edges.weights`); q/k normalisation and norms after the attention or MLP
    raise a ValueError naming the setting. After attaching, every rebuilt reader with every edge
    kept is checked against the model's own (:mod:`tl_noise.edges.check`): a model computing a
    reader otherwise is refused, with nothing left attached. With grouped key/value heads the
    ``<k>``/``<v>`` readers are one per group (:class:`~tl_noise.edges.EdgeGraph`).
    """
    check_noise_arguments(model, parameterization, seed)
    check_edge_model(model)
    form = check_form(form)
    if calibration_tokens is not None:
        check_tokens(model, calibration_tokens, "calibration_tokens")
    graph = EdgeGraph.of(model)
    layers = {
        block: NoiseLayer(
            shape,
            granularity="feature",
            parameterization=copy.deepcopy(parameterization),
            init_std=init_std,
            relative=False,
            name=block,
            form=form,
        )
        for block, shape in graph.block_shapes().items()
    }
    noise = EdgeNoise(model, layers, graph, form=form, seed=seed).to(model_device(model))
    noise.attach()
    try:
        tokens = calibration_tokens
        noise.calibrate(default_probe_tokens(model) if tokens is None else tokens)
        noise.calibration_source = "random" if tokens is None else "data"
        probe = default_probe_tokens(model, n=2, pos=16) if tokens is None else tokens[:2, :16]
        noise.check_rebuild(probe)
    except BaseException:
        noise.remove()
        raise
    return noise


def edge_importance(noise: NoiseHooks) -> dict[str, float]:
    """Importance of every edge, ``{"input->a0.h0<q>": ..., "a0.h1->m2": ..., "m2->logits":
    ...}`` (MIB's names), higher = more important: ``-log std`` of the edge's fitted noise, in
    the order :func:`tl_noise.fit` refined in context when it did (the exchanges recorded in
    ``noise.ranking_info["swaps"]``: :mod:`tl_noise.edges.refine`)."""
    if not isinstance(noise, EdgeNoise):
        raise TLNoiseTypeError(
            f"edge_importance needs edge noise (tn.attach_edge_noise), got {type(noise).__name__}"
        )
    swaps = (noise.ranking_info or {}).get("swaps")
    return refined_scores(noise.edge_scores(), swaps, list(noise.graph.locate()) if swaps else None)
