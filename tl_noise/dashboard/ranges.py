"""Axis and colour ranges of the dashboard's figures (no plotly, no Streamlit): log axes that
always carry several labelled ticks, colour ranges over a whole run, ranges clipped at a
quantile for spiky series, and cosines left undefined where a gradient vanishes.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

SCALE_CLIP = 0.95
"""The equivalent scaling factor's colours and axes end at this quantile of its values."""


def _finite(values: Any) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    return array[np.isfinite(array)]


def log_axis(values: Any) -> dict[str, Any]:
    """Plotly settings of a log axis over ``values`` that always shows several labelled ticks:
    one per decade over four decades or more, 1-2-5 over one to four, every digit below one; and
    unlabelled minor ticks."""
    positive = _finite(values)
    positive = positive[positive > 0]
    span = float(np.log10(positive.max() / positive.min())) if positive.size else 0.0
    dtick: Any = 1 if span >= 4 else "D2" if span >= 1 else "D1"
    return {"type": "log", "dtick": dtick, "exponentformat": "power", "minor": {"ticks": "inside"}}


def value_range(values: Any, scale: str, clip: float | None = None) -> tuple[float, float] | None:
    """The colour range of ``values`` in the units :func:`heatmap` colours (``log10|v|`` for
    ``"log"``; symmetric about 0 for ``"signed"``), over the finite values, ends at the ``clip``
    quantile (and ``1 - clip``) when given, taken as the nearest value inside it, so that a
    spike or two among few values is left out; None when there is nothing to range over."""
    finite = _finite(values)
    if scale == "log":
        finite = np.log10(np.abs(finite[finite != 0]))
    if finite.size == 0:
        return None
    if scale == "signed":
        magnitude = np.abs(finite)
        bound = float(np.quantile(magnitude, clip, method="lower") if clip else magnitude.max())
        return (-bound, bound) if bound > 0 else None
    if clip:  # the nearest values inside the quantiles: never interpolated towards a spike
        low = np.quantile(finite, 1 - clip, method="higher")
        high = np.quantile(finite, clip, method="lower")
    else:
        low, high = finite.min(), finite.max()
    return (float(low), float(high)) if high > low else None


def undefined_cosine(cosine: Tensor, noise_norm: Tensor, task_norm: Tensor, rel: float) -> Tensor:
    """``cosine`` with NaN where the smaller of the two norms is below ``rel`` times the largest
    norm of any head: the direction of a vanishing gradient is rounding noise."""
    largest = torch.stack([noise_norm, task_norm]).double().nan_to_num(nan=0.0).max()
    small = torch.minimum(noise_norm, task_norm).double() < rel * largest
    return cosine.masked_fill(small | ~(largest > 0), math.nan)


def clipped_axis(values: Any, clip: float = SCALE_CLIP) -> dict[str, Any]:
    """A linear axis range from the ``1 - clip`` to the ``clip`` quantile of ``values`` (padded):
    a few huge spikes run off the chart instead of flattening everything else; {} when there is
    nothing to clip."""
    bounds = value_range(values, "linear", clip)
    if bounds is None:
        return {}
    low, high = bounds
    pad = 0.1 * (high - low)
    return {"range": [low - pad, high + pad]}
