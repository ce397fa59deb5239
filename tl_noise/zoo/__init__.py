"""Benchmark models: small shipped transformers whose circuits are known, and their tasks.

The embedded induction model is easy: one previous-token head and one induction head, every
other head switched off, so every attribution method ranks it perfectly. The zoo adds models on
which methods differ (``scripts/train_benchmarks.py`` trains them; ``tests/test_zoo.py`` checks
the labelled structure):

- ``backup``: 3 layers x 4 heads + MLPs, trained with head dropout, so a copied span is predicted
  by four redundant heads: ablating the primary head alone costs ~0.1 nats, ablating it with a
  backup 0.5 - 1.3, all four ~4. Single-node scores (mean ablation, attribution patching)
  under-rank every one of them.
- ``distractor``: the same copying task inside text whose topic tokens keep three layer-2 heads
  busy everywhere: at the copied positions they write more than most circuit heads but matter
  < 0.1 nats. Methods that rank by activation size, or judge all positions instead of the
  task's mask, are fooled.
- ``mlp``: ``a b c`` triples with ``c`` a Latin-square entry of ``(a, b)``: only an MLP can compute
  it, and the heads bringing ``a`` forward have no direct effect and write little. Head-only
  methods miss the MLPs, activation-size rankings miss the heads.
- ``induction``: the embedded 2-layer model (:func:`tl_noise.models.load_embedded_model`).

All share 15 nodes (``a{l}.h{h}``, ``m{l}``), except ``induction`` (8 heads, no MLPs).

>>> bench = load_benchmark("backup")
>>> task = bench.task(n=256, seed=1)       # Task; task.extras["corrupted"] are counterfactuals
>>> round(bench.labels["nodes"]["a1.h2"]["mean_ablation"], 4)
-0.0345
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tl_noise.io import read_json, read_tensors
from tl_noise.models import (
    DATA_DIR as EMBEDDED_DIR,
)
from tl_noise.models import EMBEDDED_MODEL
from tl_noise.tasks.base import Batch, Task
from tl_noise.tasks.text import next_token_cross_entropy
from tl_noise.zoo.compiled import CompiledProgram, list_compiled, load_compiled
from tl_noise.zoo.generators import generate
from tl_noise.zoo.weights import frozen_model, load_weights

__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "COMPILED_PREFIX",
    "CompiledProgram",
    "list_benchmarks",
    "list_compiled",
    "load_benchmark",
    "load_compiled",
    "load_weights",
]

DATA_DIR = Path(__file__).parent / "data"
BENCHMARKS = ("induction", "backup", "distractor", "mlp")
COMPILED_PREFIX = "tracr-"  # load_benchmark("tracr-reverse"): a compiled program
EVAL_N, EVAL_SEED = 128, 1234  # the evaluation set of the benchmark and the demo


def exact_table_path(name: str) -> Path:
    """Where the exact faithfulness of every node subset of ``name`` on its evaluation set
    (``task(n=EVAL_N, seed=EVAL_SEED)``) is shipped (:class:`tl_noise.evaluation.exact.
    ExactTable` format; a test recomputes a random sample of it)."""
    return DATA_DIR / "exact" / name


TASK_PREFIX = "task."  # tensors in NAME.safetensors that parametrise the task, not the model


def list_benchmarks() -> list[str]:
    """Names accepted by :func:`load_benchmark`, the easy embedded model first."""
    return list(BENCHMARKS)


def benchmark_metric(logits: Tensor, batch: Batch) -> Tensor:
    """Mean ``-log p(true next token)`` at the batch's ``loss_mask`` (lower is better)."""
    return next_token_cross_entropy(logits, batch["tokens"], batch["loss_mask"])


@dataclass
class Benchmark:
    """A benchmark model, its labels and a generator of its task.

    Attributes:
        name: the benchmark's name (one of :func:`list_benchmarks`).
        model: the TransformerLens model (bridge on 4.x), eval mode, weights frozen.
        labels: ``{"nodes": {"a0.h1": {"mean_ablation": ...}, "m0": ...}, "structure": {...}}``;
            ``structure`` lists node names per designed role (``primary``, ``backup``, ...).
        info: the rest of ``NAME.json``: config, data parameters, training settings, losses.
    """

    name: str
    model: Any
    labels: dict[str, Any]
    info: dict[str, Any]
    tables: dict[str, Tensor] = field(default_factory=dict, repr=False)

    def task(self, n: int = 256, seed: int = 0) -> Task:
        """``n`` fresh sequences; ``loss_mask`` marks the target positions, ``extras`` hold the
        ``corrupted`` counterfactual tokens (same structure, other random tokens)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n={n!r}; expected an int >= 1")
        n_ctx = int(self.info["config"]["n_ctx"])
        data = self.info["data"]
        tokens, mask, corrupted, layout = generate(data, self.tables, n, seed, n_ctx)
        extras = {"corrupted": corrupted}
        if layout.shape[1]:  # copy: (source start, copy start, length); repeat: (period,)
            extras["layout"] = layout
        info = {"benchmark": self.name, "n": n, "seed": seed, **data}
        return Task(self.name, tokens, mask, benchmark_metric, extras=extras, info=info)

    def corrupted_tokens(self, task: Task) -> Tensor:
        """The counterfactual inputs of ``task`` (rows aligned with ``task.tokens``)."""
        return task.extras["corrupted"]


def load_benchmark(
    name: str, device: str | torch.device | None = None, folder: str | Path | None = None
) -> Any:
    """The benchmark ``name`` (one of :func:`list_benchmarks`, or ``tracr-NAME`` for a compiled
    program of :func:`~tl_noise.zoo.compiled.list_compiled`: a
    :class:`~tl_noise.zoo.compiled.CompiledProgram`) on ``device`` (default CPU).

    ``folder``: read ``NAME.json`` / ``NAME.safetensors`` written by
    ``scripts/train_benchmarks.py --out FOLDER`` there instead (e.g. a model trained with another
    seed, held out from the choice of defaults); the name is then the file's stem."""
    if folder is not None:
        folder, stem = Path(folder), name
        if not (folder / f"{stem}.json").is_file():
            raise ValueError(f"no benchmark {name!r} in {folder} (expected {stem}.json)")
    elif name.startswith(COMPILED_PREFIX) and name[len(COMPILED_PREFIX) :] in list_compiled():
        return load_compiled(name[len(COMPILED_PREFIX) :], device)
    elif name not in BENCHMARKS:
        known = [*BENCHMARKS, *(COMPILED_PREFIX + c for c in list_compiled())]
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(known)}")
    else:
        folder = EMBEDDED_DIR if name == "induction" else DATA_DIR
        stem = EMBEDDED_MODEL if name == "induction" else name
    meta = read_json(folder / f"{stem}.json", f"benchmark {name!r} description")
    state = read_tensors(folder / f"{stem}.safetensors", f"benchmark {name!r} weights")
    tables = {k[len(TASK_PREFIX) :]: v for k, v in state.items() if k.startswith(TASK_PREFIX)}
    weights = {k: v.float() for k, v in state.items() if not k.startswith(TASK_PREFIX)}
    model = frozen_model(meta["config"], weights, device, f"zoo:{name}")
    if name == "induction":
        meta = _induction_info(meta)
    labels = meta.pop("labels")
    return Benchmark(name, model, labels, meta, tables)


def _induction_info(meta: dict[str, Any]) -> dict[str, Any]:
    # The embedded model's JSON predates the zoo: map it onto the zoo's fields.
    cfg, truth = meta["config"], meta["ground_truth"]
    ablation = meta["scores"]["ablation"]
    nodes = {f"a{lay}.h{h}": {"mean_ablation": ablation[lay][h]}
             for lay in range(cfg["n_layers"]) for h in range(cfg["n_heads"])}  # fmt: skip
    structure = {role: [f"a{lay}.h{h}" for lay, h in heads] for role, heads in truth.items()}
    periods = meta["data"]["periods"]
    data = {"kind": "repeat", "periods": periods, "d_vocab": cfg["d_vocab"], "bos": 0}
    return {**meta, "data": data, "labels": {"nodes": nodes, "structure": structure}}
