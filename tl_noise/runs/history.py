"""Reading ``history.jsonl``: complete records only (a trailing partial line is skipped).

:func:`read_history` reads the whole file (the writer's view). :class:`HistoryReader` is the
readers' view: it remembers how far it has read and reads only the bytes appended since, starts
over when the file was replaced or cut back (a resumed run truncates its history), checks each
record against the schema (:func:`tl_noise.runs.schema.check_record`) and counts the lines it
skips (damaged, not a record, nested too deep, a number Python cannot hold).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tl_noise.errors import RunFileError
from tl_noise.io import MAX_HISTORY_BYTES, check_size
from tl_noise.runs.format import HISTORY
from tl_noise.runs.schema import open_nofollow

CHUNK_BYTES = 8 * 2**20
MAX_LINE_BYTES = 256 * 2**20
"""The longest history line a reader parses; a longer one is skipped as damaged."""
TAIL_BYTES = 64  # the bytes before the read offset that must not change between two reads


def parse_line(line: bytes) -> Any:
    """One history line as JSON, or None when it is not (partial, damaged, too deep, a number
    Python refuses)."""
    try:
        return json.loads(line)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError included
        return None


def read_history(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All complete records of a run's history (a trailing partial line is ignored)."""
    file = Path(path) / HISTORY
    if not file.exists():
        return []
    check_size(file, MAX_HISTORY_BYTES, "run history")
    records = []
    for line in file.read_bytes().split(b"\n"):
        if line.strip():
            record = parse_line(line)
            if isinstance(record, dict):
                records.append(record)
    return records


Check = Callable[[Any], tuple[dict[str, Any] | None, dict[str, str]]]


@dataclass
class HistoryReader:
    """The records of ``file``, read incrementally by :meth:`update`.

    ``records``: the records that passed ``check`` (without their bad fields); ``problems``:
    ``id(record) -> {field: what is wrong}`` for the records that kept only some fields;
    ``skipped``: how many complete lines were no record at all. A symbolic link and a file over
    ``limit`` bytes are refused (RunFileError).
    """

    file: Path
    check: Check
    limit: int = MAX_HISTORY_BYTES
    records: list[dict[str, Any]] = field(default_factory=list)
    problems: dict[int, dict[str, str]] = field(default_factory=dict)
    skipped: int = 0
    offset: int = 0  # bytes consumed: the end of the last complete line read
    _ident: tuple[int, int] | None = None
    _tail: bytes = b""
    _stamp: tuple[int, int, int, int] | None = None
    _discarding: bool = False  # inside an over-long line, skipping to its end

    def reset(self) -> None:
        self.records, self.problems, self.skipped, self.offset = [], {}, 0, 0
        self._ident, self._tail, self._stamp, self._discarding = None, b"", None, False

    def update(self) -> bool:
        """Read what was appended since the last call; True when the records changed."""
        try:
            fd = open_nofollow(self.file)
        except FileNotFoundError:
            changed = bool(self.records or self.skipped)
            self.reset()
            return changed
        with os.fdopen(fd, "rb") as handle:
            info = os.fstat(handle.fileno())
            stamp = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
            if stamp == self._stamp:
                return False
            replaced = self._ident not in (None, stamp[:2]) or info.st_size < self.offset
            if replaced or not self._tail_unchanged(handle):
                self.reset()
            if info.st_size > self.limit:
                self.reset()
                raise RunFileError(
                    f"run history {str(self.file)!r} is {info.st_size / 2**20:.0f} MiB, more than "
                    f"the {self.limit / 2**20:.0f} MiB tl-noise reads",
                    str(self.file),
                )
            before = (len(self.records), self.skipped)
            self._read_from(handle, info.st_size)
            self._ident, self._stamp = stamp[:2], stamp
        return replaced or (len(self.records), self.skipped) != before

    def _tail_unchanged(self, handle: Any) -> bool:
        if not self._tail:
            return True
        handle.seek(self.offset - len(self._tail))
        return handle.read(len(self._tail)) == self._tail

    def _read_from(self, handle: Any, size: int) -> None:
        handle.seek(self.offset)
        pending = b""
        position = self.offset
        while position < size:
            chunk = handle.read(min(CHUNK_BYTES, size - position))
            if not chunk:
                break
            position += len(chunk)
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                self._take(line)
            self.offset = position - len(pending)
            if len(pending) > MAX_LINE_BYTES:  # never hold more than one long line
                self._discarding, pending = True, b""
                self.offset = position
        if self.offset:
            handle.seek(max(0, self.offset - TAIL_BYTES))
            self._tail = handle.read(min(TAIL_BYTES, self.offset))

    def _take(self, line: bytes) -> None:
        if self._discarding:  # the end of an over-long line
            self._discarding = False
            self.skipped += 1
            return
        if not line.strip():
            return
        record, problems = self.check(parse_line(line))
        if record is None:
            self.skipped += 1
            return
        self.records.append(record)
        if problems:
            self.problems[id(record)] = problems


def stds_from_record(record: dict[str, Any]) -> dict[str, Tensor]:
    return {name: torch.tensor(value, dtype=torch.float32) for name, value in record["std"].items()}
