"""Crash-safe file writing and safe reading (safetensors + JSON, never pickle).

Every file tl-noise writes goes through :func:`atomic_write_bytes`: the bytes land in a temporary
file in the same directory, are fsync'ed, and the file is renamed over the target. A reader (the
live dashboard) or a process killed mid-write therefore sees either the old file or the new one,
never half of one.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """Read a JSON file, raising ValueError naming the file when it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} {str(path)!r} does not exist")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{what} {str(path)!r} is not valid JSON: {err}") from err


def write_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> None:
    """Atomically write a dict of tensors as safetensors (contiguous CPU copies)."""
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, save_safetensors_bytes(cpu))


def read_tensors(path: str | os.PathLike, what: str = "file") -> dict[str, torch.Tensor]:
    """Read a safetensors file; ValueError naming the file when it is missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} {str(path)!r} does not exist")
    try:
        return load_safetensors_bytes(path.read_bytes())
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise ValueError(f"{what} {str(path)!r} is truncated or corrupt: {err}") from err
