"""``attach_noise``: insert learnable noise at a model's hook points.

>>> from tl_noise.models import load_embedded_model
>>> model = load_embedded_model()
>>> tokens = torch.randint(0, model.cfg.d_vocab, (2, 8))
>>> clean = model(tokens)
>>> noise = attach_noise(model, "blocks.*.attn.hook_z", granularity="head")
>>> noise.stds()["blocks.0.attn.hook_z"].shape      # [n_heads]
torch.Size([4])
>>> torch.equal(model(tokens), clean)               # the noise is sampled at every forward pass
False
>>> noise.remove()
>>> torch.equal(model(tokens), clean)               # outputs are bit-identical to before
True
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from tl_noise.hooks.calibration import (
    check_finite_stats,
    collect_activation_stats,
    default_probe_tokens,
)
from tl_noise.hooks.noise_hooks import NoiseHooks
from tl_noise.hooks.selection import (
    UNSUPPORTED_HOOKS,
    HookSpec,
    check_model,
    check_seed,
    check_tokens,
    resolve_hook_names,
)
from tl_noise.names import MLP_HOOKS, hook_layer
from tl_noise.noise.covariance import FactorizedCovariance
from tl_noise.noise.estimator import RhoEstimator
from tl_noise.noise.layer import Granularity, NoiseLayer, check_granularity, param_shape_for
from tl_noise.noise.parameterizations import StandardDeviationParameterization

DEFAULT_FORM = "replacement"
"""The noise form :func:`attach_noise` uses unless told otherwise: information-destroying noise
ranks circuits better than additive noise on the benchmark models (README, Results)."""


def attach_noise(
    model: Any,
    hooks: HookSpec,
    granularity: str = "auto",
    parameterization: StandardDeviationParameterization | None = None,
    init_std: float = 0.05,
    covariance: Callable[[], FactorizedCovariance] | None = None,
    learn_mean: bool = False,
    per_position: bool = False,
    estimator: bool | dict[str, Any] = False,
    relative: bool = True,
    calibration_tokens: Int[Tensor, "n pos"] | None = None,
    seed: int | None = 0,
    form: str = DEFAULT_FORM,
) -> NoiseHooks:
    """Insert learnable noise at the selected hook points of ``model`` and return the hooks.

    Args:
        model: a TransformerLens ``TransformerBridge`` (4.x) or ``HookedTransformer`` (3.x).
        hooks: exact hook names, glob patterns (``"blocks.*.attn.hook_z"``) or a predicate.
        granularity: ``"head"``, ``"head_feature"``, ``"feature"``, ``"hook"``, or ``"auto"``
            (``"head"`` for ``[batch, pos, n_heads, d]`` activations, ``"hook"`` -- one std per
            MLP node -- for ``hook_mlp_out``/``mlp.hook_post``, else ``"feature"``).
        parameterization: rho -> std map (default Cloak (1e-4, 1); (1e-4, 2) when additive).
        init_std: initial std (relative to the natural scale unless ``relative=False``).
        covariance: a factory (e.g. ``lambda: KroneckerCovariance(2, 4)``) giving each layer
            its own structured covariance; ``None`` for independent noise.
        learn_mean: also learn a mean shift per parameter.
        per_position: one std per position as well (up to the calibration tokens' length).
        estimator: estimate rhos from the activation with a small network (``True`` or a dict
            of :class:`~tl_noise.layers.RhoEstimator` arguments).
        relative: scale noise by each unit's natural std measured on ``calibration_tokens``
            (uniformly random tokens if none are given; :func:`tl_noise.fit` recalibrates on
            its data in that case).
        seed: seed of the noise generator and of the initialisation of estimators and
            covariance factors (``None``: torch's global RNG for both).
        form: ``"additive"`` (``x + sigma s eps``) or ``"replacement"`` (``(1 - sigma) x +
            sigma (mu + s eps)``: information-destroying, sigma = 1 resamples the node); see
            :mod:`tl_noise.noise.forms`.

    Shapes are checked now, with a probe forward pass, not at the first training step.
    """
    check_noise_arguments(model, parameterization, seed)
    names = resolve_hook_names(model, hooks)
    source = "data" if calibration_tokens is not None else "random"
    if calibration_tokens is None:
        calibration_tokens = default_probe_tokens(model)
    check_tokens(model, calibration_tokens, "calibration_tokens")
    explicit = _names_hooks_explicitly(hooks)
    names = _drop_unsupported(names, explicit, hooks)
    stats = collect_activation_stats(model, names, calibration_tokens, require_all=explicit)
    check_finite_stats(stats, names)
    silent = [n for n in names if n not in stats]
    if silent:
        warnings.warn(f"skipping hook points that never fire: {silent}", stacklevel=2)
    names = [n for n in names if n in stats]
    if not names:
        raise ValueError(f"none of the hook points selected by {hooks!r} fires in a forward pass")
    n_positions = calibration_tokens.shape[1] if per_position else None
    with _seeded(seed):  # the same seed: the same estimator and covariance initialisation
        layers = {
            name: _build_layer(
                name,
                stats[name],
                granularity=granularity,
                parameterization=parameterization,
                init_std=init_std,
                covariance=covariance,
                learn_mean=learn_mean,
                n_positions=n_positions,
                estimator=estimator,
                relative=relative,
                form=form,
            )
            for name in names
        }
    noise = NoiseHooks(model, layers, seed=seed)
    noise.calibration_source = source
    return noise.attach()


def check_noise_arguments(model: Any, parameterization: object, seed: Any) -> None:
    """What every attach checks first: a TransformerLens model, a std parameterization (or
    None) and an int (or None) seed; TypeError naming the value otherwise."""
    check_model(model)
    check_seed(seed)
    if parameterization is not None and not isinstance(
        parameterization, StandardDeviationParameterization
    ):
        raise TypeError(
            f"parameterization={parameterization!r}; expected a StandardDeviationParameterization "
            "(e.g. tl_noise.CloakStandardDeviationParameterization()) or None"
        )


def _is_pattern(spec: str) -> bool:
    return any(c in spec for c in "*?[")


def _names_hooks_explicitly(hooks: HookSpec) -> bool:
    """Whether ``hooks`` is exact names only (no glob pattern, no predicate)."""
    if isinstance(hooks, str):
        return not _is_pattern(hooks)
    return not callable(hooks) and all(not _is_pattern(h) for h in hooks)


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Within the block torch's CPU RNG is seeded with ``seed`` (and restored afterwards)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


def _drop_unsupported(names: list[str], explicit: bool, hooks: HookSpec) -> list[str]:
    """``names`` without attention scores/patterns; asking for one by name, or selecting only
    such hooks, is a ValueError."""
    unsupported = [n for n in names if n.endswith(UNSUPPORTED_HOOKS)]
    kept = [n for n in names if n not in unsupported]
    if unsupported and (explicit or not kept):
        how = "" if explicit else f"{hooks!r} selects only attention scores/patterns; "
        raise ValueError(
            f"{how}noise on attention scores/patterns is not supported ({unsupported}); their "
            "shape [batch, n_heads, query, key] changes with the sequence length. Noise hook_z "
            "instead."
        )
    return kept


def _resolve_granularity(granularity: str, unit: tuple[int, ...], name: str) -> Granularity:
    """``"auto"``: ``"head"`` for a ``(n_heads, d)`` unit, ``"hook"`` (one std per node) for an
    MLP's output, else ``"feature"``."""
    if granularity != "auto":
        return check_granularity(granularity, name)
    if len(unit) == 2 and name.split(".")[-1] != "hook_pattern":
        return "head"
    return "hook" if hook_layer(name) is not None and name.endswith(MLP_HOOKS) else "feature"


def _build_layer(
    name: str,
    stat: dict[str, Any],
    *,
    granularity: str,
    parameterization: StandardDeviationParameterization | None,
    init_std: float,
    covariance: Callable[[], FactorizedCovariance] | None,
    learn_mean: bool,
    n_positions: int | None,
    estimator: bool | dict[str, Any],
    relative: bool,
    form: str,
) -> NoiseLayer:
    """The noise layer of hook ``name``, calibrated with its activation statistics ``stat``."""
    shape = stat["shape"]
    if len(shape) < 3:
        raise ValueError(
            f"hook point {name!r} has activation shape {list(shape)}; tl-noise "
            "needs [batch, pos, ...] activations"
        )
    unit = tuple(shape[2:])
    gran = _resolve_granularity(granularity, unit, name)
    est = None
    if estimator:
        kwargs = estimator if isinstance(estimator, dict) else {}
        n_out = max(1, int(torch.Size(param_shape_for(unit, gran, name)).numel()))
        est = RhoEstimator(int(torch.Size(unit).numel()), n_out, **kwargs)
    layer = NoiseLayer(
        unit,
        granularity=gran,
        parameterization=copy.deepcopy(parameterization),
        init_std=init_std,
        covariance=covariance() if covariance is not None else None,
        learn_mean=learn_mean,
        n_positions=n_positions,
        estimator=est,
        relative=relative,
        name=name,
        form=form,
    )
    layer.set_natural_scale(stat["std"], stat["mean"])
    _check_initial_std(layer, init_std, stat["dtype"])
    return layer.to(stat["device"])


def _check_initial_std(layer: NoiseLayer, init_std: float, dtype: torch.dtype) -> None:
    """ValueError unless the first step can be finite: an initial std of 0 (a Direct
    parameterization from 0) makes the noise loss infinite; one so large that the noise
    overflows the activations' dtype makes the task loss NaN."""
    param = layer.parameterization
    std = float(param(param.inverse(torch.tensor(float(init_std)))))
    where, kind = layer.name or "this hook", type(param).__name__
    if not (math.isfinite(std) and std > 0):
        raise ValueError(
            f"init_std={init_std!r} at {where} gives an initial std of {std:g} with {kind}: "
            "the noise loss -log(std) is infinite at step 0; choose an init_std > 0"
        )
    top = torch.finfo(dtype if dtype.is_floating_point else torch.float32).max
    scale = float(layer.natural_scale.max().clamp_min(1e-30))
    width = max(1, math.prod(layer.unit_shape))  # a layer norm downstream sums this many
    units = max(1, math.prod(layer.param_shape))  # the noise loss averages this many stds
    if std * scale * width >= top or std * units >= torch.finfo(torch.float32).max:
        raise ValueError(
            f"init_std={init_std!r} at {where} with {kind}: noise of std {std:g} times the "
            f"natural scale {scale:g} overflows {dtype} at step 0; choose a smaller init_std"
        )


def describe(noise: NoiseHooks) -> str:
    """One line per hook: name, granularity, std shape and mean std."""
    lines = []
    for name, std in noise.stds().items():
        layer = noise.layer(name)
        lines.append(f"{name}: {layer.granularity} {list(std.shape)} mean std {std.mean():.4g}")
    return "\n".join(lines)
