"""Compiled RASP programs: transformers whose every head, MLP and edge is known exactly.

``scripts/tracr/compile_programs.py`` compiles programs of tracr's library (``reverse``,
``sort_unique``, ...) with tracr in a script-only environment and exports their weights in
TransformerLens' layout with labels derived from the compiled residual stream: a node is *live*
when its weights are not all zero (tracr pads every layer to the same heads and MLP width), and an
edge ``writer->reader`` is *positive* when the residual directions the writer writes meet the
directions the reader reads. The package needs neither jax nor tracr to use them.

A compiled program is no language model: position ``t`` outputs ``program(x)[t]`` over the
program's own output vocabulary (``d_vocab_out``), attention is bidirectional, position 0 holds
``BOS``. Its task therefore carries ``targets`` (:mod:`tl_noise.hooks.targets`): the program's
output at every non-BOS position, which is what the compiled model computes (a test checks the
loaded model against tracr's own outputs and final residual stream, recorded at export). Logits
are tracr's output projection times ``logit_scale`` (tracr decodes by argmax; the scale only
sharpens the softmax that the metrics read).

>>> program = load_compiled("reverse")
>>> task = program.task(n=4, seed=0)
>>> bool((task.extras["targets"][:, 1:] == program.run(task.tokens)[:, 1:]).all())
True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from tl_noise.errors import TLNoiseValueError
from tl_noise.hooks.targets import NO_TARGET, TARGETS_KEY, clean_predictions, target_log_probs
from tl_noise.io import read_json, read_tensors
from tl_noise.tasks.base import Batch, Task
from tl_noise.zoo.weights import frozen_model

COMPILED_DIR = Path(__file__).parent / "data" / "tracr"
CHECK_PREFIX = "check."  # tensors recorded from tracr at export: tokens, outputs, resid


def list_compiled() -> list[str]:
    """Names accepted by :func:`load_compiled` (the shipped programs, sorted)."""
    return sorted(p.stem for p in COMPILED_DIR.glob("*.json"))


def target_cross_entropy(logits: Tensor, batch: Batch) -> Tensor:
    """Mean ``-log p(targets[t])`` over the batch's counted positions (lower is better)."""
    return -target_log_probs(logits, batch[TARGETS_KEY], batch["loss_mask"]).mean()


@dataclass
class CompiledProgram:
    """A compiled program, its labels and a generator of its inputs.

    Attributes:
        name: the program's name (one of :func:`list_compiled`).
        model: the TransformerLens model (native bridge on 4.x), eval mode, weights frozen.
        labels: ``{"nodes": {"a0.h0": {"live": bool, ...}, ...}, "edges": {edge: [residual
            directions it flows through]}, "constant_edges": [...], ...}`` (the export's JSON).
        info: the rest of the JSON: ``config``, ``data`` (vocabulary, ids, ``max_seq_len``).
        check: tracr's own ``tokens``, ``outputs`` and final residual ``resid`` on sample inputs.
    """

    name: str
    model: Any
    labels: dict[str, Any]
    info: dict[str, Any]
    check: dict[str, Tensor] = field(default_factory=dict, repr=False)

    @property
    def live_nodes(self) -> list[str]:
        """The heads and MLPs with weights (the rest are tracr's padding)."""
        return [n for n, v in self.labels["nodes"].items() if v["live"]]

    @property
    def edges(self) -> list[str]:
        """The positive edges (residual directions shared by writer and reader)."""
        return sorted(self.labels["edges"])

    def random_inputs(self, n: int, seed: int) -> Int[Tensor, "n pos"]:
        """``n`` inputs ``BOS x_1 .. x_L``, each ``x_i`` uniform over the program's vocabulary
        (without repeats within a row for programs that assume distinct tokens: ``sort_unique``)."""
        data = self.info["data"]
        ids = torch.tensor([data["input_ids"][v] for v in data["vocab"]])
        g = torch.Generator().manual_seed(seed)
        length = int(data["max_seq_len"])
        if data.get("unique_tokens"):
            picks = torch.rand(n, len(ids), generator=g).argsort(dim=1)[:, :length]
        else:
            picks = torch.randint(len(ids), (n, length), generator=g)
        body = ids[picks]
        return torch.cat([torch.full((n, 1), int(data["bos"])), body], dim=1)

    def run(self, tokens: Int[Tensor, "n pos"]) -> Int[Tensor, "n pos"]:
        """The program's output ids at every position (argmax of the compiled model)."""
        return clean_predictions(self.model, tokens)

    def task(self, n: int = 256, seed: int = 0) -> Task:
        """``n`` random inputs; ``loss_mask`` marks every non-BOS position, ``extras`` hold the
        program's outputs as ``targets`` and other random inputs as ``corrupted``."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise TLNoiseValueError(f"n={n!r}; expected an int >= 1")
        tokens = self.random_inputs(n, seed)
        mask = torch.ones_like(tokens, dtype=torch.bool)
        mask[:, 0] = False
        targets = self.run(tokens).masked_fill(~mask, NO_TARGET)
        corrupted = self.random_inputs(n, seed + 1_000_003)
        extras = {TARGETS_KEY: targets, "corrupted": corrupted}
        info = {"compiled": self.name, "n": n, "seed": seed}
        return Task(f"tracr-{self.name}", tokens, mask, target_cross_entropy, extras, info)

    def corrupted_tokens(self, task: Task) -> Tensor:
        """The counterfactual inputs of ``task`` (rows aligned with ``task.tokens``)."""
        return task.extras["corrupted"]


def load_compiled(name: str, device: str | torch.device | None = None) -> CompiledProgram:
    """The compiled program ``name`` (one of :func:`list_compiled`) on ``device`` (default CPU)."""
    known = list_compiled()
    if name not in known:
        raise TLNoiseValueError(f"unknown compiled program {name!r}; known: {', '.join(known)}")
    meta = read_json(COMPILED_DIR / f"{name}.json", f"compiled program {name!r} description")
    state = read_tensors(COMPILED_DIR / f"{name}.safetensors", f"compiled program {name!r}")
    check = {k[len(CHECK_PREFIX) :]: v for k, v in state.items() if k.startswith(CHECK_PREFIX)}
    weights = {k: v.float() for k, v in state.items() if not k.startswith(CHECK_PREFIX)}
    model = frozen_model(meta["config"], weights, device, f"tracr:{name}")
    labels = meta.pop("labels")
    return CompiledProgram(name, model, labels, meta, check)
