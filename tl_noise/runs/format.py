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
"""

from __future__ import annotations

from typing import Any

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


NAN = float("nan")


def as_float(value: Any) -> float:
    """A history number as a float: history writes non-finite floats as the strings ``"inf"``,
    ``"-inf"`` and ``"nan"``; anything unreadable is NaN."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return NAN
