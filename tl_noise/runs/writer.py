"""Writing a run directory (used by :func:`tl_noise.fit`; rank 0 only when distributed).

The writer knows files, not trainers: checkpoints take the noise's save function as a callable.
Every file is written atomically, history lines are appended whole and fsync'ed.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
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
from tl_noise.runs.format import (
    CHECKPOINTS,
    CONFIG,
    FINAL,
    HISTORY,
    RUN_FORMAT,
    STATUS,
    SUMMARY,
    checkpoint_folder,
)
from tl_noise.runs.history import parse_line, read_history
from tl_noise.runs.lock import RunLock

RUN_FILES = (CONFIG, STATUS, HISTORY, SUMMARY, CHECKPOINTS, FINAL, f".tmp_{FINAL}")
"""What a fit writes into its run directory (what starting a run over removes)."""


class RunWriter:
    """Writes one run directory (used by :func:`tl_noise.fit`; rank 0 only when distributed).

    It holds the directory's lock (:class:`~tl_noise.runs.lock.RunLock`) from before it looks at
    the directory until :meth:`close`: a second writer fails at once, naming the holder's PID.
    A new run goes into an empty directory, one whose run failed before its first checkpoint
    (started over, with a warning), or any run with ``overwrite=True``.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        config: dict[str, Any],
        resume: bool = False,
        overwrite: bool = False,
    ):
        self.path = Path(path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise ValueError(f"run_dir {str(self.path)!r} is not writable: {err}") from err
        self.lock = RunLock(self.path).acquire()
        try:
            self._open(config, resume, overwrite)
        except BaseException:
            self.lock.release()
            raise

    def close(self) -> None:
        """Release the directory's lock (the files stay)."""
        self.lock.release()

    def _open(self, config: dict[str, Any], resume: bool, overwrite: bool) -> None:
        existing = self.path / CONFIG
        if resume:
            if not existing.exists():
                raise ValueError(f"resume=True but {str(self.path)!r} holds no run to resume")
            old = read_json(existing, "run config")
            check_resumable(self.path, old, config)
            # a run may be extended (more steps); every other setting must match
            updated = {**old, "fit": {**old["fit"], "steps": config["fit"]["steps"]}}
            if "data" in config and not isinstance(old.get("data"), dict):
                updated["data"] = config["data"]  # from now on, resuming checks the data
            if updated != old:
                write_json(existing, updated)
            return
        if existing.exists():
            reason = "overwrite=True" if overwrite else restartable(self.path)
            if not reason:
                raise ValueError(
                    f"run_dir {str(self.path)!r} already holds a run; pass resume=True to "
                    "continue it, overwrite=True (tl-noise --force) to replace it, or choose "
                    "another directory"
                )
            warnings.warn(
                f"starting the run in {str(self.path)!r} over ({reason})", UserWarning, stacklevel=4
            )
            clear_run(self.path)
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

    def last_records(self) -> list[dict[str, Any]]:
        """The history's last complete record (as a list; empty without one), read from the
        end of the file (a long history is not read whole)."""
        return last_history_record(self.path / HISTORY)

    def truncate_history(self, before_step: int, log_every: int = 1) -> None:
        """Keep only complete history records with ``step < before_step`` on the ``log_every``
        grid (used on resume: an extended run drops its old last step's off-grid record, so the
        history is that of an uninterrupted run)."""
        kept = [
            r
            for r in read_history(self.path)
            if r["step"] < before_step and r["step"] % log_every == 0
        ]
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


def last_history_record(file: Path, chunk: int = 2**16) -> list[dict[str, Any]]:
    """The last complete, parseable record of history file ``file`` (as a list)."""
    if not file.is_file():
        return []
    with file.open("rb") as handle:
        end = handle.seek(0, os.SEEK_END)
        tail = b""
        while end > 0:
            start = max(0, end - chunk)
            handle.seek(start)
            tail = handle.read(end - start) + tail
            end = start
            lines = tail.split(b"\n")
            # the first line may be cut off; the last is partial (or empty)
            complete = lines[1:-1] if start else lines[:-1]
            for line in reversed(complete):
                record = parse_line(line) if line.strip() else None
                if isinstance(record, dict):
                    return [record]
    return []


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
        folder = checkpoint_folder(root, info["path"])  # a plain child name, never ../ or /
        if folder.is_dir():
            return int(info["step"]), folder
    except (ValueError, KeyError, TypeError):
        pass
    steps = sorted(p for p in root.glob("step_*") if not p.is_symlink()) if root.exists() else []
    return (int(steps[-1].name.split("_")[1]), steps[-1]) if steps else None


def read_trainer_state(folder: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    return (
        read_json(folder / "trainer_state.json", "trainer state"),
        read_tensors(folder / "optimizer_state.safetensors", "optimizer state"),
    )


def read_status(path: str | os.PathLike) -> dict[str, Any] | None:
    """The run's ``status.json``, or None when it is missing or unreadable."""
    try:
        status = read_json(Path(path) / STATUS, "run status")
    except ValueError:
        return None
    return status if isinstance(status, dict) else None


def restartable(path: str | os.PathLike) -> str:
    """Why the run in ``path`` may be started over (it failed before its first checkpoint, so
    there is nothing to resume), or ``""`` when it may not. Called with the lock held: a
    ``"running"`` status then belongs to a writer that died."""
    if latest_checkpoint(path) is not None:
        return ""
    status = read_status(path)
    state = status.get("state") if status else None
    if state in (None, "failed", "interrupted", "running"):
        return f"its earlier fit ended before the first checkpoint (status {state or 'missing'})"
    return ""


def clear_run(path: str | os.PathLike) -> None:
    """Remove the files a fit wrote into ``path`` (:data:`RUN_FILES`); other files stay."""
    for name in RUN_FILES:
        target = Path(path) / name
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)


def check_resumable(path: Path, old: dict[str, Any], new: dict[str, Any]) -> None:
    """ValueError naming what differs between the run's config and a resume's (every fit setting
    but ``steps``, and the data: tokens, loss mask, extras and metric)."""
    before = old.get("fit", {})
    # steps may grow; a setting the run predates (it was written by an older tl-noise) is new
    diff = config_differences(
        {k: v for k, v in before.items() if k != "steps"},
        {k: v for k, v in new.get("fit", {}).items() if k != "steps" and k in before},
    )
    if diff:
        raise ValueError(f"cannot resume {str(path)!r} with a different config: {diff}")
    if "data" not in new:
        return
    if not isinstance(old.get("data"), dict):
        warnings.warn(
            f"the run in {str(path)!r} was written before tl-noise recorded its data; resuming "
            "cannot check that the tokens, loss mask and metric are the ones it was fitted on",
            UserWarning,
            stacklevel=5,
        )
        return
    changed = data_differences(old["data"], new["data"], path)
    if changed:
        raise ValueError(
            f"cannot resume {str(path)!r} with other data: {'; '.join(changed)} (resume with "
            "the tokens, loss_mask and metric the run was started with)"
        )


def data_differences(old: dict[str, Any], new: dict[str, Any], path: Path) -> list[str]:
    """What changed between two ``"data"`` sections of run configs."""
    changed = [
        f"{key} changed (sha256 {str(old.get(key))[:12]} -> {str(new.get(key))[:12]})"
        for key in ("tokens", "loss_mask")
        if old.get(key) != new.get(key)
    ]
    before, after = old.get("extras") or {}, new.get("extras") or {}
    names = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    if names:
        changed.append(f"extras {names} changed")
    metric = _metric_difference(old.get("metric"), new.get("metric"), path)
    return changed + ([metric] if metric else [])


def _metric_difference(a: Any, b: Any, path: Path) -> str:
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return "" if a == b else f"metric changed ({a!r} -> {b!r})"
    if a.get("name") != b.get("name"):
        return f"metric changed ({a.get('name')!r} -> {b.get('name')!r})"
    if a.get("source_sha256") and b.get("source_sha256"):
        same = a["source_sha256"] == b["source_sha256"]
        return "" if same else f"metric changed (the source of {b.get('name')!r} differs)"
    warnings.warn(
        f"the source of the metric {b.get('name')!r} is not available: resuming "
        f"{str(path)!r} cannot check that it is the metric the run was fitted with",
        UserWarning,
        stacklevel=6,
    )
    return ""
