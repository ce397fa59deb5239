"""How much a saved noise config would allocate, told from the config before anything is built.

A noise config describes tensors only by their shapes (``unit_shape``, ``n_positions``, the
estimator's ``d_hidden``, the covariance's ranks), so a damaged or hostile config could make
:meth:`tl_noise.noise.NoiseLayer.from_config` allocate any amount of memory. These checks bound
every layer and the whole noise first, and refuse with the file and the field named.

>>> noise_config_elements({"unit_shape": [4, 16], "n_positions": None})
320
"""

from __future__ import annotations

import math
from typing import Any

from tl_noise.errors import TLNoiseValueError

MAX_NOISE_ELEMENTS = 2**28
"""The most numbers a saved noise may hold (1 GiB of float32), over all of its layers."""


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _covariance_factor(cov: Any, units: int) -> int:
    """Upper bound of the covariance's numbers per unit (its ranks; a full rank is ``units``)."""
    if cov is None:
        return 0
    if not isinstance(cov, dict):
        raise TLNoiseValueError(f"covariance is {cov!r}; expected a JSON object or null")
    ranks = [v for k, v in cov.items() if k.endswith("rank")]
    for rank in ranks:
        if rank is not None and not _positive_int(rank):
            raise TLNoiseValueError(f"covariance rank {rank!r}; expected an int > 0 or null")
    return max(1, sum(units if r is None else r for r in ranks))


def noise_config_elements(layer: Any) -> int:
    """An upper bound of the numbers ``NoiseLayer.from_config(layer)`` allocates (its std
    parameters per position, its mean, buffers, estimator and covariance), computed from the
    shapes in the config alone; TLNoiseValueError naming the field when a shape is malformed."""
    if not isinstance(layer, dict):
        raise TLNoiseValueError(f"layer settings are {type(layer).__name__}; expected an object")
    unit = layer.get("unit_shape")
    if not (isinstance(unit, list) and 0 < len(unit) <= 8 and all(map(_positive_int, unit))):
        raise TLNoiseValueError(f"unit_shape is {unit!r}; expected a list of ints > 0")
    units = math.prod(unit)
    positions = layer.get("n_positions")
    if positions is not None and not _positive_int(positions):
        raise TLNoiseValueError(f"n_positions is {positions!r}; expected an int > 0 or null")
    estimator = layer.get("estimator")
    hidden = estimator.get("d_hidden", 0) if isinstance(estimator, dict) else 0
    if estimator and not _positive_int(hidden):
        raise TLNoiseValueError(f"estimator.d_hidden is {hidden!r}; expected an int > 0")
    per_unit = (
        2 * (positions or 1) + 3 + 2 * hidden + _covariance_factor(layer.get("covariance"), units)
    )
    return units * per_unit


def _edge_buffers(config: dict[str, Any], file: str) -> int:
    """The writers' means and scales of edge noise (``2 * writers * d_model``), else 0."""
    if config.get("kind") != "edges":
        return 0
    graph: Any = config.get("graph")
    fingerprint: Any = config.get("fingerprint")
    try:
        layers, heads = int(graph["n_layers"]), int(graph["n_heads"])
        d_model = int(fingerprint["d_model"])
    except (KeyError, TypeError, ValueError) as err:
        raise TLNoiseValueError(f"{file!r}: malformed edge graph or fingerprint ({err!r})") from err
    if min(layers, heads, d_model) <= 0 or layers * heads * d_model > MAX_NOISE_ELEMENTS:
        raise TLNoiseValueError(f"{file!r}: edge graph {layers} x {heads} x d_model {d_model}")
    return 2 * (1 + layers * (heads + 1)) * d_model


def check_noise_config_size(config: Any, file: str, limit: int = MAX_NOISE_ELEMENTS) -> int:
    """The bound of :func:`noise_config_elements` over a saved noise config's layers
    (``config["hooks"]``); TLNoiseValueError naming ``file`` and the layer when a layer is
    malformed or the noise would hold more than ``limit`` numbers. A config without a
    ``hooks`` object passes (the loader says what is wrong with it)."""
    hooks = config.get("hooks") if isinstance(config, dict) else None
    if not isinstance(hooks, dict):
        return 0
    total = _edge_buffers(config, file)
    for name, layer in hooks.items():
        try:
            total += noise_config_elements(layer)
        except TLNoiseValueError as err:
            raise TLNoiseValueError(f"{file!r}: hooks[{name!r}]: {err}") from err
        if total > limit:
            raise TLNoiseValueError(
                f"{file!r} describes noise of more than {limit} numbers (the limit: "
                f"{limit * 4 / 2**30:.0f} GiB of float32) by hooks[{name!r}]; no tl-noise fit "
                "writes that, the file is damaged"
            )
    return total
