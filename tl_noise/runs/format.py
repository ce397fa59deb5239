"""The run directory's format: file names, the history record's fields, and config checks.

What a fit writes and what the dashboard and notebooks read.

Layout of a run directory::

    config.json                 model, hooks, noise settings, objective, mode, seed, versions
    status.json                 {"state": "running" | "completed" | "failed", "step", "message"}
    history.jsonl               one JSON object per logged step (see below)
    checkpoints/step_0000050/   noise_config.json, noise_state.safetensors,
                                trainer_state.json, optimizer_state.safetensors
    checkpoints/latest.json     {"step": 50, "path": "step_0000050"}
    final/                      noise_config.json, noise_state.safetensors (the fitted noise)
    summary.json                final ranking of heads (and ground truth when known)

Every file is written atomically (temporary file, fsync, rename; checkpoint folders are renamed
into place whole), and history lines are appended whole and fsync'ed, so a reader never sees a
half-written file and a killed run resumes from its last checkpoint. Readers skip a trailing
partial history line. A history record holds::

    {"step": k, "loss": {"task", "noise", "total", ...}, "mean_std": float,
     "equivalent": {"alpha", "scale"},              # global alphaless equivalents
     "std": {hook: nested list shaped like the std},
     "grad": {hook: {"noise_norm", "task_norm", "cosine", "noise", "task",
                     "projected", "projected_norm", "alpha", "scale"}}}   # lists, one per head

Only *full* records carry ``std`` and ``grad``; the others are *summaries* (the first four fields
only, a few hundred bytes), so the history grows by a bounded amount per step whatever the number
of stds. The first record, one in ``detail_every`` and the last are full (``detail_every`` of
:func:`tl_noise.fit`; by default chosen so a step writes at most 16 KiB on average), and every
checkpoint holds the whole noise. Numbers have 7 significant digits.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tl_noise.errors import RunFileError

RUN_FORMAT = "tl-noise/run"
CONFIG = "config.json"
STATUS = "status.json"
HISTORY = "history.jsonl"
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"
FINAL = "final"

GRAD_KEYS = (
    "noise_norm",
    "task_norm",
    "cosine",
    "noise",
    "task",
    "projected",
    "projected_norm",
    "alpha",
    "scale",
)
RUN_MARKERS = (CONFIG, STATUS, HISTORY)


def config_problem(config: Any) -> str:
    if not isinstance(config, dict):
        return "is not a JSON object"
    if config.get("format") != RUN_FORMAT:
        return f"has format {config.get('format')!r}; expected {RUN_FORMAT!r}"
    hooks = config.get("hooks")
    if not (isinstance(hooks, list) and all(isinstance(h, str) for h in hooks)):
        return "lacks the list of noised hooks"
    model = config.get("model")
    fingerprint = model.get("fingerprint") if isinstance(model, dict) else None
    if not isinstance(fingerprint, dict):
        return "lacks model.fingerprint (the model's n_layers and n_heads)"
    for field in ("n_layers", "n_heads"):
        value = fingerprint.get(field)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            return f"has model.fingerprint.{field}={value!r}; expected an int > 0"
    return ""


def checkpoint_folder(root: str | os.PathLike, name: Any) -> Path:
    """``root / name`` for the ``path`` of ``checkpoints/latest.json``: RunFileError unless
    ``name`` is a plain child name (no separator, not absolute, not ``..``, not hidden) and the
    folder is not a symbolic link, so a pointer can never lead out of its run's checkpoints."""
    root = Path(root)
    plain = isinstance(name, str) and name not in ("", ".", "..") and not name.startswith(".")
    if not plain or "/" in name or "\\" in name or "\0" in name or os.sep in name:
        raise RunFileError(
            f"{str(root / 'latest.json')!r}: path is {name!r}; expected the name of a folder in "
            f"{str(root)!r}",
            str(root / "latest.json"),
            "path",
        )
    folder = root / name
    if folder.is_symlink():
        raise RunFileError(
            f"checkpoint {str(folder)!r} is a symbolic link; not followed", str(folder)
        )
    return folder


NAN = float("nan")


def as_float(value: Any) -> float:
    """A history number as a float: history writes non-finite floats as the strings ``"inf"``,
    ``"-inf"`` and ``"nan"``; anything unreadable is NaN."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return NAN
