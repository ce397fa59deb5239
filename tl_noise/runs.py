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

from tl_noise.io import (
    MAX_HISTORY_BYTES,
    append_bytes,
    atomic_write_bytes,
    check_size,
    read_json,
    read_tensors,
    write_json,
)

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


# ------------------------------------------------------------------------------ reading runs
# Everything below reads run directories; the dashboard and the notebooks go through it only.

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
NAN = float("nan")


def _as_float(value: Any) -> float:
    # history writes non-finite floats as the strings "inf", "-inf", "nan"
    try:
        return float(value)
    except (TypeError, ValueError):
        return NAN


def hook_kind(name: str) -> str:
    """A hook name without its block (``"blocks.3.attn.hook_z"`` -> ``"attn.hook_z"``)."""
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit():
        return ".".join(parts[2:])
    return name


class Run:
    """A run directory opened for reading: config, status, history, final noise and summary.

    ``Run(path)`` reads and checks ``config.json`` at once (ValueError naming the path when the
    directory is missing, partial or corrupt); everything else is read on demand, so a run that
    is still being written can be read repeatedly. History is re-read only when the file changed
    and a trailing partial line is skipped (:func:`read_history`).

    Per-head views are ``[n_layers, n_heads]`` tensors; a head's std is the geometric mean over
    the per-head hooks of its layer (:func:`tl_noise.analysis.head_stds`), NaN where the run
    put no per-head noise.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        where = str(self.path)
        if not self.path.is_dir():
            raise ValueError(f"run directory {where!r} does not exist")
        try:
            config = read_json(self.path / CONFIG, "run config")
        except ValueError as err:
            raise ValueError(f"{where!r} is not a readable tl-noise run: {err}") from err
        problem = _config_problem(config)
        if problem:
            raise ValueError(f"{where!r} is not a readable tl-noise run: config.json {problem}")
        self.config: dict[str, Any] = config
        self.name = self.path.name
        fingerprint = config["model"]["fingerprint"]
        self.n_layers, self.n_heads = int(fingerprint["n_layers"]), int(fingerprint["n_heads"])
        self._history_key: tuple[int, int] | None = None
        self._history: list[dict[str, Any]] = []
        self._memo: dict[Any, Any] = {}

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    # --------------------------------------------------------------------- files
    def status(self) -> dict[str, Any]:
        """``{"state", "step", "message"}``; state ``"unknown"`` when status.json is unreadable."""
        try:
            status = read_json(self.path / STATUS, "run status")
        except ValueError as err:
            return {"state": "unknown", "step": None, "message": str(err)}
        if not isinstance(status, dict):
            return {"state": "unknown", "step": None, "message": "status.json is not an object"}
        return {
            "state": str(status.get("state", "unknown")),
            "step": status.get("step"),
            "message": str(status.get("message", "")),
        }

    def summary(self) -> dict[str, Any] | None:
        """The contents of ``summary.json`` (written when the fit completes), else None."""
        if not (self.path / SUMMARY).exists():
            return None
        summary = read_json(self.path / SUMMARY, "run summary")
        if not isinstance(summary, dict):
            raise ValueError(f"summary {str(self.path / SUMMARY)!r} is not a JSON object")
        return summary

    def history(self) -> list[dict[str, Any]]:
        """Complete history records, in file order (re-read only when the file changed)."""
        file = self.path / HISTORY
        try:
            info = file.stat()
            key = (info.st_size, info.st_mtime_ns)
        except OSError:
            key = (0, 0)
        if key != self._history_key:
            records = [
                r
                for r in read_history(self.path)
                if isinstance(r, dict) and isinstance(r.get("step"), int)
            ]
            self._history, self._history_key, self._memo = records, key, {}
        return self._history

    def _cached(self, key: Any, compute: Any) -> Any:
        self.history()  # drops the memo when the history changed
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def steps(self) -> list[int]:
        """The logged steps, ascending."""
        return self._cached("steps", lambda: sorted({r["step"] for r in self.history()}))

    def record(self, step: int) -> dict[str, Any]:
        """The history record of ``step`` (the last one written, after a resume)."""
        by_step = self._cached("by_step", lambda: {r["step"]: r for r in self.history()})
        if step not in by_step:
            steps = self.steps()
            span = f"steps {steps[0]}..{steps[-1]} ({len(steps)} records)" if steps else "none"
            raise ValueError(f"run {self.name!r} has no history record for step {step!r}; "
                             f"logged: {span}")  # fmt: skip
        return by_step[step]

    # ---------------------------------------------------------------------- stds
    def hook_names(self) -> list[str]:
        """The noised hook points, in the order the noise was attached."""
        return list(self.config["hooks"])

    def head_hooks(self) -> list[str]:
        """The noised hooks that carry one std per attention head (``hook_z``, ``hook_q``...)."""
        from tl_noise.analysis import HEAD_HOOKS, hook_layer

        hooks = self.config.get("noise", {}).get("hooks", {})
        return [
            name
            for name in self.hook_names()
            if hook_layer(name) is not None
            and name.endswith(HEAD_HOOKS)
            and hooks.get(name, {}).get("granularity", "head") in ("head", "head_feature")
        ]

    def feature_hooks(self) -> list[str]:
        """The noised hooks that are not per head (MLP outputs, residual stream, ...)."""
        heads = set(self.head_hooks())
        return [name for name in self.hook_names() if name not in heads]

    def stds_at(self, step: int) -> dict[str, Tensor]:
        """Hook name -> std at ``step`` (shaped as the noise granularity)."""
        return self._cached(("stds", step), lambda: self._stds_of(self.record(step), step))

    def _stds_of(self, record: dict[str, Any], step: int) -> dict[str, Tensor]:
        try:
            return stds_from_record(record)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(
                f"run {self.name!r}: malformed std in history step {step}: {err}"
            ) from err

    def final_stds(self) -> dict[str, Tensor]:
        """The fitted stds: from ``final/`` (safetensors) when the run completed, else the last
        history record (a run still going, or input-dependent noise)."""
        folder = self.path / FINAL
        if (folder / "noise_state.safetensors").is_file():
            stds = _stds_from_noise_folder(folder)
            if stds is not None:
                return stds
        records = self.history()
        if not records:
            raise ValueError(f"run {self.name!r} has no final noise and no history record yet")
        return self._stds_of(records[-1], records[-1]["step"])

    def _head_view(self, stds: dict[str, Tensor]) -> dict[str, Tensor]:
        # per-position noise has a leading position axis: pool it geometrically per head
        hooks = self.config.get("noise", {}).get("hooks", {})
        out = {}
        for name in self.head_hooks():
            if name not in stds:
                continue
            std = stds[name]
            if hooks.get(name, {}).get("n_positions") is not None and std.ndim >= 2:
                std = std.double().log().mean(0).exp().float()
            out[name] = std
        return out

    def head_std_matrix(self, step: int | None = None) -> Tensor:
        """``[n_layers, n_heads]`` std per head at ``step`` (None: the final stds)."""
        from tl_noise.analysis import head_stds

        stds = self.final_stds() if step is None else self.stds_at(step)
        return head_stds(self._head_view(stds), self.n_layers, self.n_heads)

    # ----------------------------------------------------------------- gradients
    def grad_hook_kinds(self, step: int | None = None) -> list[str]:
        """Per-head hook kinds (``"attn.hook_z"``) with gradient records at ``step`` (None:
        the last record)."""
        records = self.history()
        if not records:
            return []
        record = records[-1] if step is None else self.record(step)
        grads = record.get("grad") or {}
        heads = set(self.head_hooks())
        return sorted({hook_kind(n) for n in grads if n in heads},
                      key=lambda k: (not k.endswith("hook_z"), k))  # fmt: skip

    def grad_matrix(self, step: int, key: str, kind: str | None = None) -> Tensor:
        """``[n_layers, n_heads]`` of gradient statistic ``key`` at ``step``.

        ``key``: one of :data:`GRAD_KEYS` (``noise_norm``/``task_norm``: norms of the noise- and
        task-loss gradients of each head's parameters; ``cosine`` between them; ``noise``/
        ``task``/``projected``: their sums (the projected one is what the optimiser used);
        ``alpha``/``scale``: the composite ``alpha`` and step scale equivalent to the alphaless
        update on that head). ``kind``: which per-head hook (default: ``hook_z`` when noised).
        NaN where a layer has no record.
        """
        if key not in GRAD_KEYS:
            raise ValueError(f"gradient key {key!r}; accepted: {', '.join(GRAD_KEYS)}")
        kinds = self.grad_hook_kinds(step)
        if not kinds:
            raise ValueError(f"run {self.name!r} has no per-head gradient record at step {step}")
        kind = kinds[0] if kind is None else kind
        if kind not in kinds:
            raise ValueError(f"hook kind {kind!r} has no gradient record; recorded: {kinds}")
        return self._cached(("grad", step, key, kind), lambda: self._grad(step, key, kind))

    def _grad(self, step: int, key: str, kind: str) -> Tensor:
        from tl_noise.analysis import hook_layer

        out = torch.full((self.n_layers, self.n_heads), NAN)
        for name, stats in (self.record(step).get("grad") or {}).items():
            layer = hook_layer(name)
            if hook_kind(name) != kind or layer is None or key not in stats:
                continue
            values = [_as_float(v) for v in stats[key]]
            if len(values) != self.n_heads or not 0 <= layer < self.n_layers:
                raise ValueError(f"run {self.name!r}: gradient {key!r} of {name!r} at step {step} "
                                 f"has {len(values)} values; expected {self.n_heads}")  # fmt: skip
            out[layer] = torch.tensor(values)
        return out

    # -------------------------------------------------------------------- frames
    def loss_frame(self) -> Any:
        """pandas DataFrame, one row per logged step: step, task, noise, total, mean_std,
        lambda, alpha, scale (the last two: global alphaless equivalents)."""
        import pandas as pd

        def build() -> Any:
            rows = []
            for r in self.history():
                loss, eq = r.get("loss") or {}, r.get("equivalent") or {}
                rows.append({
                    "step": r["step"],
                    **{k: _as_float(loss.get(k)) for k in ("task", "noise", "total", "lambda")},
                    "mean_std": _as_float(r.get("mean_std")),
                    "alpha": _as_float(eq.get("alpha")),
                    "scale": _as_float(eq.get("scale")),
                })  # fmt: skip
            columns = ["step", "task", "noise", "total", "mean_std", "lambda", "alpha", "scale"]
            return pd.DataFrame(rows, columns=columns)

        return self._cached("loss_frame", build).copy()

    def history_frame(self) -> Any:
        """pandas DataFrame, one row per step x per-head hook x head: step, hook, layer, head,
        std (geometric mean over a head's features/positions) and, when recorded, the gradient
        statistics of :data:`GRAD_KEYS`."""
        import pandas as pd

        from tl_noise.analysis import hook_layer

        def build() -> Any:
            columns: dict[str, list[Any]] = {k: [] for k in ("step", "hook", "layer", "head")}
            columns.update({k: [] for k in ("std", *GRAD_KEYS)})
            seen: set[str] = set()
            for r in self.history():
                view = self._head_view(self._stds_of(r, r["step"]))
                grads = r.get("grad") or {}
                for name, std in view.items():
                    per_head = std.double().reshape(self.n_heads, -1).log().mean(1).exp()
                    stats = grads.get(name) or {}
                    seen.update(k for k in stats if k in GRAD_KEYS)
                    for head in range(self.n_heads):
                        columns["step"].append(r["step"])
                        columns["hook"].append(name)
                        columns["layer"].append(hook_layer(name))
                        columns["head"].append(head)
                        columns["std"].append(float(per_head[head]))
                        for k in GRAD_KEYS:
                            values = stats.get(k)
                            ok = isinstance(values, list) and len(values) == self.n_heads
                            columns[k].append(_as_float(values[head]) if ok else NAN)
            keep = ["step", "hook", "layer", "head", "std", *(k for k in GRAD_KEYS if k in seen)]
            return pd.DataFrame({k: columns[k] for k in keep})

        return self._cached("history_frame", build).copy()

    def ranking_frame(self, step: int | None = None) -> Any:
        """pandas DataFrame of heads, most important first: rank, layer, head, std, importance
        (``-log std``) and, when the run knows its circuit, the ground-truth class ("" if none).
        """
        import pandas as pd

        from tl_noise.analysis import head_ranking

        std = self.head_std_matrix(step)
        importance = -std.log()
        truth = self.ground_truth() or {}
        label = {(int(l_), int(h)): cls for cls, heads in truth.items() for l_, h in heads}
        rows = []
        for i in head_ranking(importance).tolist():
            layer, head = divmod(int(i), self.n_heads)
            if bool(std[layer, head].isnan()):
                continue
            row = {
                "rank": len(rows) + 1,
                "layer": layer,
                "head": head,
                "std": float(std[layer, head]),
                "importance": float(importance[layer, head]),
            }
            if truth:
                row["ground_truth"] = label.get((layer, head), "")
            rows.append(row)
        columns = ["rank", "layer", "head", "std", "importance"] + (["ground_truth"] * bool(truth))
        return pd.DataFrame(rows, columns=columns)

    # -------------------------------------------------------------- annotations
    def ground_truth(self) -> dict[str, list[list[int]]] | None:
        """Known circuit heads ``{class: [[layer, head], ...]}`` from the model (config) or the
        summary, else None."""
        truth = self.config["model"].get("ground_truth")
        if truth is None:
            try:
                truth = (self.summary() or {}).get("ground_truth")
            except ValueError:
                truth = None
        if not truth:
            return None
        groups = truth if isinstance(truth, dict) else {"circuit": truth}
        out: dict[str, list[list[int]]] = {}
        for cls, heads in groups.items():
            pairs = [[int(p[0]), int(p[1])] for p in heads if isinstance(p, (list, tuple))
                     and len(p) == 2 and 0 <= int(p[0]) < self.n_layers
                     and 0 <= int(p[1]) < self.n_heads]  # fmt: skip
            if pairs:
                out[str(cls)] = pairs
        return out or None

    def faithfulness(self) -> dict[str, list[float]] | None:
        """``{"k": [...], "faithfulness": [...]}`` from ``summary.json`` when recorded."""
        try:
            curve = (self.summary() or {}).get("faithfulness")
        except ValueError:
            return None
        if not isinstance(curve, dict):
            return None
        ks, values = curve.get("k", curve.get("ks")), curve.get("faithfulness")
        if not (isinstance(ks, list) and isinstance(values, list) and len(ks) == len(values)):
            return None
        return {"k": [int(k) for k in ks], "faithfulness": [_as_float(v) for v in values]}


def _config_problem(config: Any) -> str:
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


def _stds_from_noise_folder(folder: Path) -> dict[str, Tensor] | None:
    """Stds of noise saved with ``NoiseHooks.save`` without the model (None when the std is a
    function of the input, i.e. an estimator layer)."""
    from tl_noise.hooks import CONFIG_FILE, STATE_FILE
    from tl_noise.layers import NoiseLayer

    config = read_json(folder / CONFIG_FILE, "noise config")
    state = read_tensors(folder / STATE_FILE, "noise state")
    out = {}
    try:
        for name in config["order"]:
            layer_config = config["hooks"][name]
            if layer_config.get("estimator"):
                return None
            layer = NoiseLayer.from_config(layer_config, name=name)
            prefix = f"layers.{name.replace('.', '__')}."
            layer.load_state_dict({k[len(prefix):]: v for k, v in state.items()
                                   if k.startswith(prefix)})  # fmt: skip
            with torch.no_grad():
                out[name] = layer.std().detach().float().cpu()
    except (KeyError, TypeError, RuntimeError) as err:
        raise ValueError(
            f"final noise in {str(folder)!r} does not match its config: {err}"
        ) from err
    return out


def load_run(path: str | os.PathLike) -> Run:
    """Open a run directory for reading (see :class:`Run`)."""
    return Run(path)


def _looks_like_run(folder: Path) -> bool:
    return any((folder / f).is_file() and not (folder / f).is_symlink() for f in RUN_MARKERS)


def list_runs(root: str | os.PathLike, max_depth: int = 4) -> list[Path]:
    """Run directories under ``root`` (or ``[root]`` when it is one), sorted.

    A run directory holds config.json, status.json or history.jsonl (a partial or corrupt one
    is listed too, so that a reader can say what is wrong with it). The search stays inside the
    resolved ``root``: symbolic links are never followed, hidden folders (temporary checkpoint
    folders) are skipped, and it goes at most ``max_depth`` folders deep.
    """
    base = Path(root)
    if not base.is_dir():
        raise ValueError(f"runs root {str(root)!r} is not a directory")
    base = base.resolve()
    if _looks_like_run(base):
        return [base]
    found = []
    for here, subdirs, _ in os.walk(base, followlinks=False):
        depth = len(Path(here).relative_to(base).parts)
        descend = []
        for name in sorted(subdirs):
            child = Path(here) / name
            if name.startswith(".") or child.is_symlink():
                continue
            if not child.resolve().is_relative_to(base):
                continue
            if _looks_like_run(child):
                found.append(child)
            elif depth + 1 < max_depth:
                descend.append(name)
        subdirs[:] = descend
    return sorted(found)
