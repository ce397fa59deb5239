"""Checks on saved noise (``noise_config.json`` + ``noise_state.safetensors``) before it loads.

A file tl-noise did not write, a newer format, a missing checksum or tensors that no fit could
have produced (NaN/inf, integers where the noise has floats) are refused with the file named.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

NOISE_FORMAT_VERSION = 1
"""The version of ``noise_config.json`` this tl-noise writes (and the newest it reads). Every
version-1 file tl-noise wrote holds ``state_sha256``."""


def check_saved_config(config: Any, file: Path) -> str | None:
    """The state checksum a saved noise config records; ValueError when its format version is
    newer than this tl-noise's or the checksum a version-1 file always has is missing."""
    if not isinstance(config, dict) or config.get("format") != "tl-noise/noise-hooks":
        return None  # from_config says what is wrong with it
    version = config.get("version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"{str(file)!r} has format version {version!r}; expected an int >= 1")
    if version > NOISE_FORMAT_VERSION:
        raise ValueError(
            f"{str(file)!r} has format version {version}, newer than the version "
            f"{NOISE_FORMAT_VERSION} this tl-noise reads; upgrade tl-noise to load it"
        )
    expected = config.get("state_sha256")
    if not (isinstance(expected, str) and expected):
        raise ValueError(
            f"{str(file)!r} has no state_sha256 (every noise config tl-noise writes records the "
            "checksum of its state): the file was edited or damaged; save the noise again"
        )
    return expected


def check_saved_state(state: dict[str, Tensor], own: dict[str, Tensor], path: Path) -> None:
    """ValueError unless the saved tensors are exactly the noise's: the same names and shapes,
    floating point where the noise has floats (finite ones), the same dtype elsewhere."""
    bad = sorted(set(own) ^ set(state))
    if bad:
        raise ValueError(f"noise state in {str(path)!r} has missing/unexpected tensors: {bad}")
    for key, value in state.items():
        expected = own[key]
        if tuple(value.shape) != tuple(expected.shape):
            raise ValueError(
                f"noise state tensor {key!r} has shape {list(value.shape)}, expected "
                f"{list(expected.shape)}"
            )
        floating = expected.is_floating_point()
        same_kind = floating == value.is_floating_point()
        if not same_kind or (not floating and value.dtype != expected.dtype):
            want = "a floating-point dtype" if floating else expected.dtype
            raise ValueError(
                f"noise state tensor {key!r} in {str(path)!r} has dtype {value.dtype}, "
                f"expected {want}"
            )
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(
                f"noise state tensor {key!r} in {str(path)!r} holds NaN or inf values; no fit "
                "writes those (the file is damaged or was edited)"
            )
