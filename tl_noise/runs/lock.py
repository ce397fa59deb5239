"""One writer per run directory: an exclusive ``flock`` on ``run_dir/.lock``.

A fit holds the lock from before it looks at the directory until it ends; the operating system
releases it when the process dies (also on a kill -9), so a stale lock file never blocks a later
fit. The file holds the holder's PID, which a refused second writer names. Readers (the
dashboard, notebooks) never take the lock.
"""

from __future__ import annotations

import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, no protection
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".lock"


class RunLock:
    """The exclusive lock of the run directory ``path`` (``acquire``/``release``, or ``with``)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.file = self.path / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        """Take the lock, or raise ValueError naming the directory and the holder's PID."""
        if self._fd is not None or fcntl is None:
            return self
        while True:
            fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_pid(fd)
                os.close(fd)
                raise ValueError(
                    f"run_dir {str(self.path)!r} is in use by another fit (PID {holder}); a run "
                    "directory has one writer: wait for it to end or choose another directory"
                ) from None
            except BaseException:
                os.close(fd)
                raise
            if _same_file(fd, self.file):
                break
            os.close(fd)  # the holder removed the file after we opened it: lock the new one
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file and release the lock (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            self.file.unlink(missing_ok=True)  # while still held: no one can be locking it
        except OSError:
            pass
        os.close(fd)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 64, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "unknown"


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
