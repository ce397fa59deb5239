"""Reading ``history.jsonl``: complete records only (a trailing partial line is skipped)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tl_noise.io import MAX_HISTORY_BYTES, check_size
from tl_noise.runs.format import HISTORY


def read_history(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All complete records of a run's history (a trailing partial line is ignored)."""
    file = Path(path) / HISTORY
    if not file.exists():
        return []
    check_size(file, MAX_HISTORY_BYTES, "run history")
    records = []
    for line in file.read_bytes().split(b"\n"):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue  # a line still being written, or damaged: skip it
    return records


def stds_from_record(record: dict[str, Any]) -> dict[str, Tensor]:
    return {name: torch.tensor(value, dtype=torch.float32) for name, value in record["std"].items()}
