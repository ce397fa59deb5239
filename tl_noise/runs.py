"""The run directory: what a fit writes and what the dashboard and notebooks read.

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

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tl_noise.io import atomic_write_bytes, read_json, read_tensors, write_json

RUN_FORMAT = "tl-noise/run"
CONFIG = "config.json"
STATUS = "status.json"
HISTORY = "history.jsonl"
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"
FINAL = "final"


class RunWriter:
    """Writes one run directory (used by :func:`tl_noise.fit`; rank 0 only when distributed)."""

    def __init__(self, path: str | os.PathLike, config: dict[str, Any], resume: bool = False):
        self.path = Path(path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise ValueError(f"run_dir {str(self.path)!r} is not writable: {err}") from err
        existing = self.path / CONFIG
        if resume:
            if not existing.exists():
                raise ValueError(f"resume=True but {str(self.path)!r} holds no run to resume")
            old = read_json(existing, "run config")
            # a run may be extended (more steps); every other setting must match
            diff = config_differences(
                {k: v for k, v in old.get("fit", {}).items() if k != "steps"},
                {k: v for k, v in config.get("fit", {}).items() if k != "steps"},
            )
            if diff:
                raise ValueError(
                    f"cannot resume {str(self.path)!r} with a different config: {diff}"
                )
            if "steps" in config.get("fit", {}):
                write_json(
                    existing, {**old, "fit": {**old["fit"], "steps": config["fit"]["steps"]}}
                )
        elif existing.exists():
            raise ValueError(
                f"run_dir {str(self.path)!r} already holds a run; pass resume=True to continue it "
                "or choose another directory"
            )
        else:
            write_json(existing, {"format": RUN_FORMAT, "version": 1, **config})

    def status(self, state: str, step: int, message: str = "") -> None:
        write_json(self.path / STATUS, {"state": state, "step": step, "message": message})

    def append_history(self, records: list[dict[str, Any]]) -> None:
        """Append whole lines and fsync them (one write call per batch of records)."""
        if not records:
            return
        data = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records).encode()
        with open(self.path / HISTORY, "ab") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())

    def truncate_history(self, before_step: int) -> None:
        """Keep only complete history records with ``step < before_step`` (used on resume)."""
        kept = [r for r in read_history(self.path) if r["step"] < before_step]
        atomic_write_bytes(
            self.path / HISTORY,
            "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in kept).encode(),
        )

    def checkpoint(
        self, step: int, save_noise: Any, trainer_state: dict[str, Any], tensors: dict[str, Tensor]
    ) -> Path:
        """Write checkpoint ``step`` into a temporary folder and rename it into place."""
        root = self.path / CHECKPOINTS
        root.mkdir(exist_ok=True)
        name = f"step_{step:07d}"
        tmp = root / f".tmp_{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        save_noise(tmp)
        write_json(tmp / "trainer_state.json", {"step": step, **trainer_state})
        from tl_noise.io import write_tensors

        write_tensors(tmp / "optimizer_state.safetensors", tensors)
        final = root / name
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        write_json(root / "latest.json", {"step": step, "path": name})
        return final

    def write_final(self, save_noise: Any, summary: dict[str, Any]) -> None:
        tmp = self.path / f".tmp_{FINAL}"
        shutil.rmtree(tmp, ignore_errors=True)
        save_noise(tmp)
        shutil.rmtree(self.path / FINAL, ignore_errors=True)
        os.replace(tmp, self.path / FINAL)
        write_json(self.path / SUMMARY, summary)


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(set(old) | set(new))
    return ", ".join(
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)
    )


def read_history(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All complete records of a run's history (a trailing partial line is ignored)."""
    file = Path(path) / HISTORY
    if not file.exists():
        return []
    records = []
    for line in file.read_bytes().split(b"\n"):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue  # a line still being written, or damaged: skip it
    return records


def latest_checkpoint(path: str | os.PathLike) -> tuple[int, Path] | None:
    """``(step, folder)`` of the newest complete checkpoint, or None."""
    root = Path(path) / CHECKPOINTS
    try:
        info = read_json(root / "latest.json", "checkpoint pointer")
        folder = root / info["path"]
        if folder.is_dir():
            return int(info["step"]), folder
    except (ValueError, KeyError, TypeError):
        pass
    steps = sorted(root.glob("step_*")) if root.exists() else []
    return (int(steps[-1].name.split("_")[1]), steps[-1]) if steps else None


def read_trainer_state(folder: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    return (
        read_json(folder / "trainer_state.json", "trainer state"),
        read_tensors(folder / "optimizer_state.safetensors", "optimizer state"),
    )


def stds_from_record(record: dict[str, Any]) -> dict[str, Tensor]:
    return {name: torch.tensor(value, dtype=torch.float32) for name, value in record["std"].items()}
