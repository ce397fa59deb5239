"""Oversized files in a run directory are refused by name, without being read into memory."""

from __future__ import annotations

import os

import pytest

from tl_noise import io
from tl_noise.runs import load_run, read_history

pytestmark = pytest.mark.tl3


def sparse(path, size):
    with open(path, "wb") as handle:
        handle.truncate(size)  # a sparse file: no disk space, no memory


def test_oversized_config_is_refused(tmp_path):
    sparse(tmp_path / "config.json", io.MAX_JSON_BYTES + 1)
    with pytest.raises(ValueError, match=r"config\.json.*MiB"):
        load_run(tmp_path)


def test_oversized_history_is_refused(tmp_path):
    sparse(tmp_path / "history.jsonl", io.MAX_HISTORY_BYTES + 1)
    with pytest.raises(ValueError, match=r"history\.jsonl.*MiB"):
        read_history(tmp_path)
    assert os.path.getsize(tmp_path / "history.jsonl") == io.MAX_HISTORY_BYTES + 1
