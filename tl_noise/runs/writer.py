"""Writing a run directory (used by :func:`tl_noise.fit`; rank 0 only when distributed).

The writer knows files, not trainers: checkpoints take the noise's save function as a callable.
Every file is written atomically, history lines are appended whole and fsync'ed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from torch import Tensor

from tl_noise.io import (
    append_bytes,
    atomic_write_bytes,
    read_json,
    read_tensors,
    write_json,
    write_tensors,
)
from tl_noise.runs.format import CHECKPOINTS, CONFIG, FINAL, HISTORY, RUN_FORMAT, STATUS, SUMMARY
from tl_noise.runs.history import read_history


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
        """Append whole lines and fsync them (one write call per batch of records); a failed
        write (a full disk) is cut back off, leaving the history as it was."""
        if not records:
            return
        data = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records).encode()
        append_bytes(self.path / HISTORY, data)

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
