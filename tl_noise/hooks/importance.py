"""Reading fitted noise as importance: one score per node, higher = more important.

A node (head ``a{l}.h{h}``, MLP ``m{l}``, or any other noised hook under its own name) that
tolerates only tiny noise is one the behaviour depends on. Its score is ``-log(std)``, pooled
geometrically over the node's features and positions and over every noised hook of the node
(``hook_z``, ``hook_q``... of one head; ``hook_mlp_out`` and ``mlp.hook_post`` of one MLP).

A node whose every unit never varies (a dead head, an empty MLP: natural scale 0 under relative
noise) carries no information and gets no noise whatever its std, so no task gradient informs that
std: it scores lowest, ``DEAD_MARGIN`` below the lowest live node (ties in node order).

When :func:`tl_noise.fit` derived a ranking of its own (a path or a refinement, recorded in
``noise.node_scores``), :func:`node_importance` returns that instead: it is what the default fit
answers.
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float
from torch import Tensor

from tl_noise.errors import TLNoiseValueError
from tl_noise.hooks.noise_hooks import NoiseHooks
from tl_noise.names import head_node, hook_nodes, node_sort_key
from tl_noise.ranking import head_stds


def _log_std_per_node(name: str, std: Tensor, n_heads: int, per_position: bool) -> dict[str, float]:
    """Mean ``log std`` of each node hook ``name``'s std belongs to."""
    nodes = hook_nodes(name, n_heads)
    logs = std.double().clamp_min(1e-30).log()
    if len(nodes) > 1:  # a per-head hook: [pos?, n_heads, ...]
        if per_position:
            logs = logs.mean(0)
        if logs.ndim == 0:  # one std for the whole hook: every head gets it
            return dict.fromkeys(nodes, float(logs))
        per_head = logs.reshape(n_heads, -1).mean(-1)
        return {node: float(per_head[i]) for i, node in enumerate(nodes)}
    return {nodes[0]: float(logs.mean())}


DEAD_MARGIN = 1.0


def _dead_nodes(name: str, scale: Tensor, n_heads: int) -> set[str]:
    """The nodes of hook ``name`` whose natural scale is zero in every unit."""
    nodes = hook_nodes(name, n_heads)
    if len(nodes) > 1:  # a per-head hook: the unit shape starts with the heads
        alive = scale.reshape(n_heads, -1).abs().amax(-1) > 0
        return {node for i, node in enumerate(nodes) if not bool(alive[i])}
    return set(nodes) if not bool((scale.abs() > 0).any()) else set()


def std_node_scores(noise: NoiseHooks) -> dict[str, float]:
    """``-log std`` per node from the current stds, in node order (see module doc); for edge
    noise, each node's best outgoing edge (:meth:`tl_noise.edges.EdgeNoise.std_node_scores`)."""
    if noise.kind != "nodes":
        return noise.std_node_scores()  # type: ignore[operator]
    n_heads = int(noise.model.cfg.n_heads)
    sums: dict[str, list[float]] = {}
    dead: dict[str, bool] = {}
    for name, std in noise.stds().items():
        layer = noise.layer(name)
        per_position = layer.n_positions is not None
        lifeless = _dead_nodes(name, layer.natural_scale, n_heads) if layer.relative else set()
        for node, value in _log_std_per_node(name, std, n_heads, per_position).items():
            sums.setdefault(node, []).append(value)
            dead[node] = dead.get(node, True) and node in lifeless
    scores = {node: -sum(v) / len(v) for node, v in sums.items()}
    live = [scores[n] for n in scores if not dead[n]]
    floor = (min(live) if live else 0.0) - DEAD_MARGIN
    scores = {n: floor if dead[n] else value for n, value in scores.items()}
    return {node: scores[node] for node in sorted(scores, key=node_sort_key)}


def node_importance(noise: NoiseHooks) -> dict[str, float]:
    """Importance of every noised node, ``{"a0.h1": ..., "m0": ..., "hook_embed": ...}``, in node
    order (layer, then head, then the MLP); higher = more important.

    The ranking :func:`tl_noise.fit` recorded with the noise when there is one, else ``-log std``
    pooled per node (:func:`std_node_scores`).
    """
    if not isinstance(noise, NoiseHooks):
        raise TypeError(f"node_importance needs NoiseHooks, got {type(noise).__name__}")
    if noise.node_scores is not None:
        return dict(noise.node_scores)
    return std_node_scores(noise)


def head_importance(
    noise: NoiseHooks | dict[str, Tensor], n_layers: int | None = None, n_heads: int | None = None
) -> Float[Tensor, "n_layers n_heads"]:
    """Importance of each attention head ``[n_layers, n_heads]`` (higher = more important): the
    heads' part of :func:`node_importance`, NaN for heads without noise.

    Also accepts a ``stds()`` dict (then give ``n_layers`` and ``n_heads``): ``-log`` of the
    per-head geometric-mean std.
    """
    if not isinstance(noise, NoiseHooks):
        if n_layers is None or n_heads is None:
            raise TLNoiseValueError("head_importance(stds_dict) needs n_layers and n_heads")
        return -head_stds(noise, n_layers, n_heads).log()
    n_layers = n_layers or int(noise.model.cfg.n_layers)
    n_heads = n_heads or int(noise.model.cfg.n_heads)
    scores = node_importance(noise)
    out = torch.full((n_layers, n_heads), math.nan)
    for layer in range(n_layers):
        for head in range(n_heads):
            out[layer, head] = scores.get(head_node(layer, head), math.nan)
    return out
