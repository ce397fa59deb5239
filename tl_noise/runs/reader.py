"""Reading run directories: :class:`Run`, :func:`load_run` and :func:`list_runs`.

The dashboard and the notebooks read runs only through this module, while a fit may still be
writing them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tl_noise.hooks.noise_hooks import CONFIG_FILE, STATE_FILE
from tl_noise.io import read_json, read_tensors
from tl_noise.names import hook_kind, hook_layer, is_head_hook
from tl_noise.noise.layer import NoiseLayer
from tl_noise.ranking import head_stds
from tl_noise.runs.format import (
    CONFIG,
    FINAL,
    GRAD_KEYS,
    HISTORY,
    NAN,
    RUN_MARKERS,
    STATUS,
    SUMMARY,
    as_float,
    config_problem,
)
from tl_noise.runs.frames import RunFrames
from tl_noise.runs.history import read_history, stds_from_record


class Run(RunFrames):
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
        problem = config_problem(config)
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
        hooks = self.config.get("noise", {}).get("hooks", {})
        return [
            name
            for name in self.hook_names()
            if is_head_hook(name)
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
        out = torch.full((self.n_layers, self.n_heads), NAN)
        for name, stats in (self.record(step).get("grad") or {}).items():
            layer = hook_layer(name)
            if hook_kind(name) != kind or layer is None or key not in stats:
                continue
            values = [as_float(v) for v in stats[key]]
            if len(values) != self.n_heads or not 0 <= layer < self.n_layers:
                raise ValueError(f"run {self.name!r}: gradient {key!r} of {name!r} at step {step} "
                                 f"has {len(values)} values; expected {self.n_heads}")  # fmt: skip
            out[layer] = torch.tensor(values)
        return out

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
        return {"k": [int(k) for k in ks], "faithfulness": [as_float(v) for v in values]}


def _stds_from_noise_folder(folder: Path) -> dict[str, Tensor] | None:
    """Stds of noise saved with ``NoiseHooks.save`` without the model (None when the std is a
    function of the input, i.e. an estimator layer)."""
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
        for child in _visible_subfolders(Path(here), subdirs, base):
            if _looks_like_run(child):
                found.append(child)
            elif depth + 1 < max_depth:
                descend.append(child.name)
        subdirs[:] = descend
    return sorted(found)


def _visible_subfolders(here: Path, subdirs: list[str], base: Path) -> list[Path]:
    """The sub-folders of ``here`` to look at, sorted: not hidden, not a symbolic link, and
    inside ``base`` once resolved."""
    children = [here / name for name in sorted(subdirs) if not name.startswith(".")]
    return [c for c in children if not c.is_symlink() and c.resolve().is_relative_to(base)]
