"""Crash-safe file writing and safe reading (safetensors + JSON, never pickle).

Every file tl-noise writes goes through :func:`atomic_write_bytes`: the bytes land in a temporary
file in the same directory, are fsync'ed, and the file is renamed over the target. A reader (the
live dashboard) or a process killed mid-write therefore sees either the old file or the new one,
never half of one; a failed write (a full disk) leaves the old file and raises an OSError naming
the target. The one exception, the append-only run history, goes through :func:`append_bytes`,
which cuts a failed append back off.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes


def _write_all(fd: int, data: bytes, path: Path) -> None:
    """The low-level write: all of ``data`` to the open file ``fd`` (destined for ``path``).

    Every byte tl-noise writes passes through here (tests replace it to simulate a full disk).
    """
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _with_path(err: BaseException, path: Path) -> BaseException:
    """An OSError that names ``path`` (ENOSPC from ``write`` carries no file name)."""
    if not isinstance(err, OSError) or err.filename is not None:
        return err
    reason = err.strerror or str(err) or type(err).__name__
    message = f"could not write {str(path)!r}: {reason}"
    return OSError(err.errno, message) if err.errno is not None else OSError(message)


def _fsync_dir(folder: Path) -> None:
    try:  # make renames in ``folder`` durable
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def _write_temporary(path: Path, data: bytes) -> str:
    """Write ``data`` to a fsync'ed temporary file beside ``path``; return its name. On any
    failure the temporary file is removed and ``path`` is untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            _write_all(fd, data, path)
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        wrapped = _with_path(err, path)
        if wrapped is err:
            raise
        raise wrapped from err
    return tmp


DEFERRED_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
)


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Within the block Ctrl-C/SIGTERM/SIGHUP are held back and delivered once it ends.

    A write is then never cut short between its temporary file and its rename (a second Ctrl-C
    while the first one's status is being written leaves no stray temporary file and no stale
    file). Only the main thread can change signal handlers; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    saved: dict[int, Any] = {}
    try:
        for sig in DEFERRED_SIGNALS:
            previous = signal.getsignal(sig)
            if previous is None:  # a handler installed outside Python: leave it alone
                continue
            saved[sig] = previous
            signal.signal(sig, lambda signum, frame: pending.append(signum))
        yield
    finally:
        for sig, previous in saved.items():
            signal.signal(sig, previous)
        for sig in dict.fromkeys(pending):
            signal.raise_signal(sig)  # now handled as it would have been


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename).

    A failure (full disk, I/O error, a kill) leaves the previous content of ``path`` in place;
    an OSError names ``path``.
    """
    atomic_write_files({Path(path): data})


def atomic_write_files(files: dict[Path, bytes]) -> None:
    """Write several files so that a failed write changes none of them: every temporary file is
    written and fsync'ed before the first rename (used for files that must agree, such as a
    noise state and the config holding its checksum). Interrupts wait until the files are in
    place (:func:`signals_deferred`)."""
    with signals_deferred():
        written: list[tuple[str, Path]] = []
        try:
            for path, data in files.items():
                written.append((_write_temporary(Path(path), data), Path(path)))
            for tmp, path in written:
                os.replace(tmp, path)
        except BaseException:
            for tmp, _ in written:
                Path(tmp).unlink(missing_ok=True)
            raise
        for folder in dict.fromkeys(path.parent for _, path in written):
            _fsync_dir(folder)


def append_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Append ``data`` to ``path`` with one write and fsync it. If the write fails (a full disk)
    the file is cut back to its previous length, so it never keeps part of ``data``."""
    path = Path(path)
    with signals_deferred():
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            size = os.fstat(fd).st_size
            try:
                _write_all(fd, data, path)
                os.fsync(fd)
            except BaseException as err:
                os.ftruncate(fd, size)
                wrapped = _with_path(err, path)
                if wrapped is err:
                    raise
                raise wrapped from err
        finally:
            os.close(fd)


def json_bytes(obj: Any) -> bytes:
    """``obj`` as the indented, key-sorted JSON text tl-noise writes."""
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    """A dict of tensors as safetensors bytes (contiguous CPU copies)."""
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return save_safetensors_bytes(cpu)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    atomic_write_bytes(path, json_bytes(obj))


MAX_JSON_BYTES = 64 * 2**20
MAX_HISTORY_BYTES = 2 * 2**30


def check_size(path: Path, limit: int, what: str) -> None:
    """ValueError naming the file when it is larger than ``limit`` bytes (never read it whole)."""
    size = path.stat().st_size
    if size > limit:
        raise ValueError(
            f"{what} {str(path)!r} is {size / 2**20:.0f} MiB, more than the {limit / 2**20:.0f} "
            "MiB tl-noise reads; it is not a file tl-noise wrote, or it is damaged"
        )


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """Read a JSON file, raising ValueError naming the file when it is missing, oversized or
    malformed."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} {str(path)!r} does not exist")
    check_size(path, MAX_JSON_BYTES, what)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{what} {str(path)!r} is not valid JSON: {err}") from err


def write_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> None:
    """Atomically write a dict of tensors as safetensors (contiguous CPU copies)."""
    atomic_write_bytes(path, tensor_bytes(tensors))


MAX_TENSOR_BYTES = 4 * 2**30
MAX_TENSOR_HEADER_BYTES = 100 * 2**20  # the safetensors format's own limit
DTYPE_BYTES = (
    dict.fromkeys(("BOOL", "U8", "I8", "F8_E4M3", "F8_E5M2"), 1)
    | dict.fromkeys(("U16", "I16", "F16", "BF16"), 2)
    | dict.fromkeys(("U32", "I32", "F32"), 4)
    | dict.fromkeys(("U64", "I64", "F64"), 8)
)


def _corrupt(what: str, path: Path, reason: str) -> ValueError:
    return ValueError(f"{what} {str(path)!r} is truncated or corrupt: {reason}")


def tensor_header(path: str | os.PathLike, what: str = "file") -> dict[str, tuple[str, list[int]]]:
    """The tensors a safetensors file holds, ``name -> (dtype, shape)``, from its header alone
    (the first 8 bytes: the header's length, little-endian; then the JSON header); ValueError
    naming the file when it is missing or the header is malformed. Reads no tensor data."""
    return _header(Path(path), what)[1]


def _header(path: Path, what: str) -> tuple[int, dict[str, tuple[str, list[int]]]]:
    """``(bytes of data after the header, tensors)`` of a safetensors file."""
    if not path.is_file():
        raise ValueError(f"{what} {str(path)!r} does not exist")
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        start = handle.read(8)
        length = int.from_bytes(start, "little") if len(start) == 8 else -1
        if not 2 <= length <= min(MAX_TENSOR_HEADER_BYTES, size - 8):
            raise _corrupt(what, path, f"a header of {length} bytes in a file of {size} bytes")
        raw = handle.read(length)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
        raise _corrupt(what, path, f"the header is not JSON ({err})") from err
    if not isinstance(header, dict):
        raise _corrupt(what, path, "the header is not a JSON object")
    out: dict[str, tuple[str, list[int]]] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        shape = entry.get("shape") if isinstance(entry, dict) else None
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        dims = shape if isinstance(shape, list) and dtype in DTYPE_BYTES else None
        if dims is None or not all(type(d) is int and d >= 0 for d in dims):
            raise _corrupt(what, path, f"tensor {name!r} has dtype {dtype!r}, shape {shape!r}")
        out[name] = (str(dtype), [int(d) for d in dims])
    return size - 8 - length, out


def tensor_data_bytes(header: dict[str, tuple[str, list[int]]]) -> int:
    """Bytes of tensor data a :func:`tensor_header` describes."""
    total = 0
    for dtype, shape in header.values():
        count = 1
        for dim in shape:
            count *= dim
        total += count * DTYPE_BYTES[dtype]
    return total


def _amount(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"


def _too_big(what: str, path: Path, size: str, limit: int, why: str) -> ValueError:
    return ValueError(
        f"{what} {str(path)!r} {size}, more than the limit of {_amount(limit)} of tensors "
        f"({why}); tl-noise did not write it, or it is damaged"
    )


def _read_file(path: Path) -> bytes:
    """The one place tensor files are read whole (tests count the reads)."""
    return path.read_bytes()


def read_tensor_file(
    path: str | os.PathLike,
    what: str = "file",
    limit: int = MAX_TENSOR_BYTES,
    why: str = "the most tl-noise reads",
) -> tuple[bytes, dict[str, torch.Tensor]]:
    """``(bytes, tensors)`` of a safetensors file, read once (the bytes serve for a checksum).

    The sizes are checked before anything but the header is read: the file and the tensors its
    header declares must stay within ``limit`` bytes of data (``why`` says where the limit comes
    from); ValueError naming the file and the limit otherwise, or when it is missing or corrupt.
    """
    path = Path(path)
    if path.is_file() and path.stat().st_size - 8 - MAX_TENSOR_HEADER_BYTES > limit:
        size = f"is {_amount(path.stat().st_size)}"
        raise _too_big(what, path, size, limit, why)  # before reading a byte
    data_size, header = _header(path, what)  # missing or malformed: named
    declared = tensor_data_bytes(header)
    if max(declared, data_size) > limit:
        size = f"declares {_amount(declared)} of tensors in {_amount(data_size)} of data"
        raise _too_big(what, path, size, limit, why)
    data = _read_file(path)
    try:
        return data, load_safetensors_bytes(data)
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise _corrupt(what, path, str(err)) from err


def read_tensors(
    path: str | os.PathLike, what: str = "file", limit: int = MAX_TENSOR_BYTES
) -> dict[str, torch.Tensor]:
    """Read a safetensors file of at most ``limit`` bytes of tensors, checked from its header
    before the data is read; ValueError naming the file when it is missing, corrupt or larger."""
    return read_tensor_file(path, what, limit)[1]
