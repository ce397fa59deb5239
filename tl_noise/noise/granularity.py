"""Granularities (one std per hook, head, feature, head and feature) and the noise modes."""

from __future__ import annotations

from typing import Literal, get_args

Granularity = Literal["hook", "head", "feature", "head_feature"]
GRANULARITIES: tuple[Granularity, ...] = get_args(Granularity)
NoiseMode = Literal["sample", "mean", "off"]
NOISE_MODES: tuple[NoiseMode, ...] = get_args(NoiseMode)


DEAD_UNIT_RTOL = 1e-6
"""A unit whose std is at most this fraction of its hook's largest never varies (float error)."""


def check_granularity(granularity: str, name: str = "") -> Granularity:
    """``granularity`` as a :data:`Granularity`; ValueError listing the accepted ones if not."""
    for accepted in GRANULARITIES:
        if granularity == accepted:
            return accepted
    where = f" at {name!r}" if name else ""
    raise ValueError(f"granularity={granularity!r}{where}; accepted: {', '.join(GRANULARITIES)}")


def check_noise_mode(mode: str) -> NoiseMode:
    """``mode`` as a :data:`NoiseMode`; ValueError listing the accepted ones if not."""
    for accepted in NOISE_MODES:
        if mode == accepted:
            return accepted
    raise ValueError(f"mode={mode!r}; accepted: {', '.join(NOISE_MODES)}")


def param_shape_for(
    unit_shape: tuple[int, ...], granularity: str, name: str = ""
) -> tuple[int, ...]:
    """Shape of the std parameters for an activation whose per-position unit is ``unit_shape``.

    ``"hook"`` -> ``()``; ``"head"`` -> ``(n_heads,)`` (needs a 2-D unit ``(n_heads, d)``);
    ``"feature"`` -> ``unit_shape``; ``"head_feature"`` -> ``unit_shape`` (needs a 2-D unit).
    """
    where = f" at {name!r}" if name else ""
    granularity = check_granularity(granularity, name)
    if granularity == "hook":
        return ()
    if granularity in ("head", "head_feature") and len(unit_shape) != 2:
        raise ValueError(
            f"granularity={granularity!r}{where} needs an activation with a head axis "
            f"[batch, pos, n_heads, d]; this one is [batch, pos, {', '.join(map(str, unit_shape))}]"
            ". Use 'feature' or 'hook' for residual-stream and MLP hooks."
        )
    if granularity == "head":
        return (unit_shape[0],)
    return tuple(unit_shape)
