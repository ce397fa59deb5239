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

from tl_noise.edges.graph import EdgeGraph
from tl_noise.edges.refine import refined_scores
from tl_noise.errors import RunFileError, TLNoiseValueError
from tl_noise.hooks.noise_hooks import CONFIG_FILE, STATE_FILE
from tl_noise.io import read_tensor_file
from tl_noise.names import hook_kind, hook_layer, is_head_hook
from tl_noise.noise.layer import NoiseLayer
from tl_noise.noise.sizing import check_noise_config_size
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
)
from tl_noise.runs.frames import RunFrames
from tl_noise.runs.history import HistoryReader, stds_from_record
from tl_noise.runs.schema import (
    check_config,
    check_record,
    check_status,
    faithfulness_of,
    ground_truth_of,
    read_run_json,
    record_shapes,
    refuse_links,
)


class Run(RunFrames):
    """A run directory opened for reading: config, status, history, final noise and summary.

    ``Run(path)`` reads and checks ``config.json`` at once (ValueError naming the path when the
    directory is missing, partial or corrupt); everything else is read on demand, so a run that
    is still being written can be read repeatedly. Every file is checked against the schema of
    :mod:`tl_noise.runs.schema` (:class:`~tl_noise.errors.RunFileError`, a ValueError, naming
    the file and the field) and read without following symbolic links. History is read
    incrementally (only the bytes appended since the last read; from the start again when a
    resumed run cut it back); a trailing partial line and damaged lines are skipped and counted,
    and fields that fail the schema are dropped from their record (:meth:`history_problems`).

    Per-head views are ``[n_layers, n_heads]`` tensors; a head's std is the geometric mean over
    the per-head hooks of its layer (:func:`tl_noise.analysis.head_stds`), NaN where the run
    put no per-head noise.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        where = str(self.path)
        if not self.path.is_dir():
            raise ValueError(f"run directory {where!r} does not exist")
        file = self.path / CONFIG
        try:
            config = check_config(read_run_json(file, "run config"), str(file))
        except RunFileError as err:
            raise RunFileError(
                f"{where!r} is not a readable tl-noise run: {err}", err.file, err.field
            ) from err
        self.config: dict[str, Any] = config
        self.name = self.path.name
        fingerprint = config["model"]["fingerprint"]
        self.n_layers, self.n_heads = int(fingerprint["n_layers"]), int(fingerprint["n_heads"])
        shapes = record_shapes(config)
        self._reader = HistoryReader(self.path / HISTORY, lambda r: check_record(r, shapes))
        self._memo: dict[Any, Any] = {}

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    # --------------------------------------------------------------------- files
    def status(self) -> dict[str, Any]:
        """``{"state", "step", "message"}``; state ``"unknown"`` when status.json is unreadable."""
        file = self.path / STATUS
        try:
            return check_status(read_run_json(file, "run status"), str(file))
        except RunFileError as err:
            return {"state": "unknown", "step": None, "message": str(err)}

    def summary(self) -> dict[str, Any] | None:
        """The contents of ``summary.json`` (written when the fit completes), else None."""
        file = self.path / SUMMARY
        if not os.path.lexists(file):
            return None
        summary = read_run_json(file, "run summary")
        if not isinstance(summary, dict):
            raise RunFileError(f"summary {str(file)!r} is not a JSON object", str(file))
        return summary

    def history(self) -> list[dict[str, Any]]:
        """Complete history records, in file order (read incrementally: only what was appended
        since the last call; RunFileError when the file is a link or over the size limit)."""
        if self._reader.update():
            self._memo = {}
        return self._reader.records

    def history_problems(self) -> tuple[int, dict[int, dict[str, str]]]:
        """``(skipped, problems)``: how many history lines were skipped as no record at all
        (damaged, nested too deep, ...), and ``{step: {field: what is wrong}}`` of the records
        whose fields failed the schema (those fields are dropped from the record)."""
        records = self.history()
        problems = self._reader.problems
        found = {r["step"]: problems[id(r)] for r in records if id(r) in problems}
        return self._reader.skipped, found

    def record_problems(self, step: int) -> dict[str, str]:
        """``{field: what is wrong}`` of the history record of ``step`` ({} when it is sound)."""
        return self._reader.problems.get(id(self.record(step)), {})

    def _cached(self, key: Any, compute: Any) -> Any:
        self.history()  # drops the memo when the history changed
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def steps(self) -> list[int]:
        """The logged steps, ascending."""
        return self._cached("steps", lambda: sorted({r["step"] for r in self.history()}))

    def full_steps(self) -> list[int]:
        """The logged steps whose record is full (every std and the per-head gradients), or
        whose std field is damaged (so a view says what is wrong), ascending. The others are
        summaries: losses and the mean std only (see ``detail_every`` of :func:`tl_noise.fit`)."""
        return self._cached(
            "full_steps",
            lambda: sorted({r["step"] for r in self.history() if self.is_full(r)}),
        )

    def is_full(self, record: dict[str, Any]) -> bool:
        """Whether a history record is full (has stds, or had a damaged std field)."""
        return "std" in record or "std" in self._reader.problems.get(id(record), {})

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
        where = f"run {self.name!r}: malformed std in history step {step}"
        file = str(self.path / HISTORY)
        if "std" not in record:
            problem = self._reader.problems.get(id(record), {}).get("std", "the record has none")
            raise RunFileError(f"{where}: {problem}", file, f"step {step}: std")
        try:
            return stds_from_record(record)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise RunFileError(f"{where}: {err}", file, f"step {step}: std") from err

    def final_stds(self) -> dict[str, Tensor]:
        """The fitted stds: from ``final/`` (safetensors) when the run completed, else the last
        history record (a run still going, or input-dependent noise)."""
        folder = refuse_links(self.path, FINAL)
        if refuse_links(folder, STATE_FILE).is_file():
            stds = _stds_from_noise_folder(folder)
            if stds is not None:
                return stds
        records = [r for r in self.history() if self.is_full(r)]
        if not records:
            raise ValueError(f"run {self.name!r} has no final noise and no full history record yet")
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
        the last full record)."""
        records = [r for r in self.history() if self.is_full(r)]
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
            problem = self.record_problems(step).get("grad")
            raise RunFileError(
                f"run {self.name!r} has no per-head gradient record at step {step}"
                + (f": {problem}" if problem else ""),
                str(self.path / HISTORY),
                f"step {step}: grad",
            )
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
                raise RunFileError(f"run {self.name!r}: gradient {key!r} of {name!r} at step "
                                   f"{step} has {len(values)} values; expected {self.n_heads}",
                                   str(self.path / HISTORY), f"step {step}: grad")  # fmt: skip
            out[layer] = torch.tensor(values)
        return out

    # -------------------------------------------------------------- annotations
    def ground_truth(self) -> dict[str, list[list[int]]] | None:
        """Known circuit heads ``{class: [[layer, head], ...]}`` from the model (config) or the
        summary, else None (RunFileError when the summary's is malformed)."""
        fingerprint = self.config["model"]["fingerprint"]
        truth = ground_truth_of(self.config["model"].get("ground_truth"), fingerprint, CONFIG)
        if truth is None:
            summary = self.summary() or {}
            truth = ground_truth_of(summary.get("ground_truth"), fingerprint, str(self._summary))
        return truth

    def faithfulness(self) -> dict[str, list[float]] | None:
        """``{"k": [...], "faithfulness": [...]}`` from ``summary.json`` when recorded
        (RunFileError when it is malformed)."""
        return faithfulness_of((self.summary() or {}).get("faithfulness"), str(self._summary))

    # -------------------------------------------------------------------- edges
    def is_edge_run(self) -> bool:
        """Whether the run fitted edge noise (:func:`tl_noise.attach_edge_noise`)."""
        return (self.config.get("noise") or {}).get("kind") == "edges"

    def edge_graph(self) -> EdgeGraph:
        """The run's :class:`~tl_noise.edges.EdgeGraph` (RunFileError when the config's is
        malformed or the run is not an edge run)."""
        graph: Any = (self.config.get("noise") or {}).get("graph")
        try:
            return EdgeGraph.from_config(graph)
        except TLNoiseValueError as err:
            raise RunFileError(f"run {self.name!r} has no edge graph in its config ({err!r})",
                               str(self.path / CONFIG), "noise.graph") from err  # fmt: skip

    def edge_scores(self, step: int | None = None) -> dict[str, float]:
        """``{edge: -log std}`` (MIB names) at ``step``; None: the fitted noise, in the order the
        fit refined it to (``summary.json``'s ``ranking_info["swaps"]``, as
        ``tn.edge_importance``)."""
        graph = self.edge_graph()
        stds = self.final_stds() if step is None else self.stds_at(step)
        out: dict[str, float] = {}
        for block, (rows, columns) in graph.block_shapes().items():
            std = stds.get(block)
            if std is None or tuple(std.shape) != (rows, columns):
                raise RunFileError(f"run {self.name!r}: the std of edge block {block!r} is "
                                   f"missing or misshapen", str(self.path))  # fmt: skip
            logs = -std.double().clamp_min(1e-30).log()
            for row, names in enumerate(graph.edge_names(block)):
                out.update(zip(names, logs[row].tolist(), strict=True))
        if step is not None:
            return out
        info = (self.summary() or {}).get("ranking_info")
        swaps = info.get("swaps") if isinstance(info, dict) else None
        try:
            swaps = swaps if isinstance(swaps, list) and swaps else None
            return refined_scores(out, swaps, list(graph.locate()) if swaps else None)
        except (TLNoiseValueError, TypeError) as err:
            raise RunFileError(f"run {self.name!r}: summary.json's ranking_info swaps: {err}",
                               str(self._summary)) from err  # fmt: skip

    def edge_curve(self) -> dict[str, list[float]] | None:
        """``{"k": [...], "faithfulness": [...]}``: the faithfulness of the top-k edges measured
        at the end of the fit (``summary.json``'s ``ranking_info``), None when not recorded."""
        info = (self.summary() or {}).get("ranking_info")
        curve = info.get("faithfulness") if isinstance(info, dict) else None
        return faithfulness_of(curve, str(self._summary))

    def edge_ablation(self) -> str:
        """How the end-of-fit curve ablated the edges outside a circuit: ``"mean"`` (default
        fits; runs that did not record it) or ``"resample"`` (fits with corrupted tokens)."""
        info = (self.summary() or {}).get("ranking_info")
        ablation = info.get("ablation") if isinstance(info, dict) else None
        return "resample" if ablation == "resample" else "mean"

    @property
    def _summary(self) -> Path:
        return self.path / SUMMARY


def _read_noise_folder(folder: Path) -> tuple[Any, dict[str, Tensor]]:
    """``(config, state)`` of noise saved in ``folder``: no link followed, the sizes checked from
    the config and the state's header before anything is allocated or read (RunFileError)."""
    try:
        config = read_run_json(refuse_links(folder, CONFIG_FILE), "noise config")
        elements = check_noise_config_size(config, str(folder / CONFIG_FILE))
        why = "the size of the noise its config describes"
        state = refuse_links(folder, STATE_FILE)
        return config, read_tensor_file(state, "noise state", 8 * elements, why)[1]
    except RunFileError:
        raise
    except ValueError as err:
        raise RunFileError(f"final noise in {str(folder)!r}: {err}", str(folder)) from err


def _stds_from_noise_folder(folder: Path) -> dict[str, Tensor] | None:
    """Stds of noise saved with ``NoiseHooks.save`` without the model (None when the std is a
    function of the input, i.e. an estimator layer)."""
    config, state = _read_noise_folder(folder)
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
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as err:
        raise RunFileError(
            f"final noise in {str(folder)!r} does not match its config: {err}", str(folder)
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
