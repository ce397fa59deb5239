"""Edge circuits judged with every other edge ablated, the smallest one at a target, and edge
attribution patching.

A circuit is a set of edges; every edge outside it is ablated: its reader sees the writer's mean
contribution over the evaluation set (``ablation="mean"``) or the writer's contribution on a
corrupted input (``"resample"``) instead of the writer's own (:meth:`EdgeNoise.fixed`). The
metric ``m`` is the mean log-probability of the true next token at the loss-mask positions (or the
task's metric, negated: metrics are losses), and MIB's normalised faithfulness is

    f(C) = (m(C) - m(empty)) / (m(all) - m(empty)).

:func:`extract_circuit` finds the smallest prefix of a ranking whose ``f`` reaches a target
(a geometric scan, then bisection), verifies it by a forward pass, then drops edges whose removal
keeps ``f`` at the target (lowest-ranked first, one forward each, within a budget).
:meth:`EdgeCircuitEvaluator.attribution` is edge attribution patching: ``dm / dsigma`` at
``sigma = 0``, i.e. ``(c'_w - c_w) . dm/dx_r`` per edge, from one forward and backward.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from tl_noise.edges.graph import EdgeGraph
from tl_noise.errors import TLNoiseTypeError, TLNoiseValueError
from tl_noise.hooks.ablation import eval_batches
from tl_noise.hooks.owners import attached_noise
from tl_noise.hooks.selection import check_model, check_tokens
from tl_noise.hooks.targets import TARGETS_KEY, resolve_targets, target_log_probs

Metric = Callable[[Tensor, dict[str, Tensor]], Tensor]
ABLATIONS = ("mean", "resample")


@contextmanager
def other_noise_detached(model: Any) -> Iterator[None]:
    """Within the block no tl-noise noise is attached to ``model``; it is put back afterwards."""
    noises = attached_noise(model)
    for noise in noises:
        noise.remove()
    try:
        yield
    finally:
        for noise in noises:
            noise.attach()


class EdgeCircuitEvaluator:
    """``m(C)`` and ``f(C)`` of edge sets on one evaluation set.

    Args:
        model: a TransformerLens model edge noise attaches to (:func:`attach_edge_noise`).
        tokens: ``[n, pos]``; ``loss_mask``: ``[n, pos]`` bool target positions (default every
            position with a next token).
        ablation: ``"mean"`` (over every example and position of ``tokens``) or ``"resample"``
            (``corrupted_tokens``, shaped like ``tokens``: each example's own counterfactual).
        metric: a loss ``metric(logits, batch)`` (batch: ``tokens``, ``loss_mask``, ``index`` and
            ``extras``) instead of the log-probability of the target.
        targets: ``[n, pos]`` what each prediction is judged against when no ``metric`` is given
            (default ``extras["targets"]``, else the next token, or the clean model's argmax when
            its outputs are not input tokens: :func:`tl_noise.hooks.targets.resolve_targets`).

    Use it inside ``with evaluator:`` (or call :meth:`close`): it attaches its own edge noise
    and takes any other tl-noise noise off the model until it is closed.
    """

    def __init__(
        self,
        model: Any,
        tokens: Int[Tensor, "n pos"],
        loss_mask: Bool[Tensor, "n pos"] | None = None,
        ablation: str = "mean",
        corrupted_tokens: Int[Tensor, "n pos"] | None = None,
        metric: Metric | None = None,
        extras: Mapping[str, Tensor] | None = None,
        batch_size: int = 32,
        targets: Int[Tensor, "n pos"] | None = None,
    ) -> None:
        from tl_noise.edges.attach import attach_edge_noise

        check_model(model)
        check_tokens(model, tokens)
        if ablation not in ABLATIONS:
            raise TLNoiseValueError(f"ablation={ablation!r}; accepted: {', '.join(ABLATIONS)}")
        mask = torch.ones_like(tokens, dtype=torch.bool) if loss_mask is None else loss_mask
        if mask.shape != tokens.shape or mask.dtype != torch.bool:
            raise TLNoiseValueError(
                f"loss_mask must be a bool tensor shaped like the tokens {list(tokens.shape)}"
            )
        if ablation == "resample":
            if corrupted_tokens is None or corrupted_tokens.shape != tokens.shape:
                raise TLNoiseValueError(
                    "ablation='resample' needs corrupted_tokens shaped like the tokens "
                    f"{list(tokens.shape)}"
                )
            check_tokens(model, corrupted_tokens, "corrupted_tokens")
        elif corrupted_tokens is not None:
            raise TLNoiseValueError(
                "corrupted_tokens are used by ablation='resample' only; this is ablation='mean'"
            )
        self.model, self.tokens, self.mask = model, tokens, mask
        self.ablation, self.corrupted = ablation, corrupted_tokens
        self.metric_fn, self.extras = metric, dict(extras or {})
        self.batches = eval_batches(tokens.shape[0], batch_size)
        self._detached = other_noise_detached(model)
        self._detached.__enter__()
        try:
            self.targets = None
            if metric is None:
                given = self.extras.get(TARGETS_KEY) if targets is None else targets
                self.targets = resolve_targets(model, tokens, mask, given, batch_size)
            self.noise = attach_edge_noise(model, calibration_tokens=tokens)
            self.graph = self.noise.graph
            self.locate = self.graph.locate()
            self.edges = list(self.locate)
            self.forwards = 0  # forward passes over the evaluation set
            self.full_metric = self.metric(self.edges)
            self.empty_metric = self.metric([])
        except BaseException:
            self.close()
            raise
        if not abs(self.full_metric - self.empty_metric) > 1e-9:
            self.close()
            raise TLNoiseValueError(
                f"ablating every edge leaves the metric at {self.full_metric:.6g}: "
                "faithfulness is undefined on this task"
            )

    def close(self) -> None:
        """Take the evaluator's noise off and put the model's other noise back."""
        if getattr(self, "noise", None) is not None:
            self.noise.remove()
        self._detached.__exit__(None, None, None)

    def __enter__(self) -> EdgeCircuitEvaluator:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ metric
    def sigmas(self, keep: Collection[str], requires_grad: bool = False) -> dict[str, Tensor]:
        """``{block: sigma}`` with 0 for the edges in ``keep`` and 1 elsewhere."""
        device = self.noise.writer_mean.device
        out = {b: torch.ones(s, device=device) for b, s in self.graph.block_shapes().items()}
        for edge in keep:
            if edge not in self.locate:
                raise TLNoiseValueError(f"{edge!r} is not an edge of this model")
            block, row, column = self.locate[edge]
            out[block][row, column] = 0.0
        if requires_grad:
            out = {b: s.requires_grad_(True) for b, s in out.items()}
        return out

    def _batch_metric(self, logits: Tensor, index: Tensor) -> tuple[Tensor, int]:
        """``(sum of the metric over the batch, how many terms)``."""
        tokens, mask = self.tokens[index].to(logits.device), self.mask[index].to(logits.device)
        if self.targets is not None:
            logp = target_log_probs(logits, self.targets[index].to(logits.device), mask)
            return logp.sum(), logp.numel()
        assert self.metric_fn is not None
        batch = {"tokens": tokens, "loss_mask": mask, "index": index}
        batch.update({k: v[index].to(logits.device) for k, v in self.extras.items()})
        return -self.metric_fn(logits, batch) * len(index), len(index)

    def _run(self, sigmas: dict[str, Tensor], index: Tensor) -> Tensor:
        device = self.noise.writer_mean.device
        with self.noise.fixed(sigmas):
            if self.corrupted is None:
                return self.model(self.tokens[index].to(device))
            patch = self.noise.contributions_of(self.corrupted[index])
            with self.noise.patched(patch):
                return self.model(self.tokens[index].to(device))

    @torch.no_grad()
    def metric(self, keep: Collection[str]) -> float:
        """``m(C)``: the metric with every edge outside ``keep`` ablated."""
        sigmas = self.sigmas(keep)
        total, count = 0.0, 0
        for index in self.batches:
            value, terms = self._batch_metric(self._run(sigmas, index), index)
            total, count = total + float(value), count + terms
        self.forwards += 1
        return total / max(count, 1)

    def faithfulness(self, keep: Collection[str]) -> float:
        """MIB's ``f(C) = (m(C) - m(empty)) / (m(all) - m(empty))``."""
        span = self.full_metric - self.empty_metric
        return (self.metric(keep) - self.empty_metric) / span

    def attribution(self) -> dict[str, float]:
        """Edge attribution patching: ``|dm/dsigma_e|`` at ``sigma = 0`` (every edge kept), the
        first-order change of ``m`` when edge ``e`` alone is ablated; one forward and backward
        per batch (counted as 3 forwards)."""
        sigmas = self.sigmas(self.edges, requires_grad=True)
        count = 0
        for index in self.batches:
            value, terms = self._batch_metric(self._run(sigmas, index), index)
            value.backward()
            count += terms
        self.forwards += 3
        out: dict[str, float] = {}
        for block, sigma in sigmas.items():
            grad = (sigma.grad if sigma.grad is not None else torch.zeros_like(sigma)) / count
            for row, names in enumerate(self.graph.edge_names(block)):
                out.update(zip(names, grad[row].abs().tolist(), strict=True))
        return out


@dataclass
class ExtractedCircuit:
    """The circuit :func:`extract_circuit` found: its edges (in ranking order), its measured
    faithfulness, the prefix it was pruned from and what the search cost."""

    edges: list[str]
    faithfulness: float
    target: float
    prefix: int  # edges in the smallest prefix that reached the target, before pruning
    forwards: int
    curve: dict[int, float] = field(default_factory=dict)  # prefix size -> f, as measured

    @property
    def nodes(self) -> list[str]:
        """The heads and MLPs the circuit's edges touch (``input``/``logits`` left out)."""
        found: dict[str, None] = {}
        for edge in self.edges:
            writer, reader = edge.split("->")
            found.setdefault(writer)
            found.setdefault(reader.split("<")[0])
        return [n for n in found if n not in ("input", "logits")]


def check_edge_scores(scores: Any, model: Any) -> None:
    """TypeError/ValueError unless ``scores`` is ``{edge: finite number}`` naming edges of
    ``model``'s graph (checked before any forward pass)."""
    if not isinstance(scores, Mapping):
        raise TLNoiseTypeError(f"scores must be an {{edge: score}} mapping, got "
                               f"{type(scores).__name__}")  # fmt: skip
    bad = {e: v for e, v in scores.items() if isinstance(v, bool)
           or not isinstance(v, (int, float)) or not math.isfinite(v)}  # fmt: skip
    if bad:
        raise TLNoiseValueError(f"scores must be finite numbers; got {dict(list(bad.items())[:5])}")
    check_model(model)
    unknown = sorted(set(scores) - set(EdgeGraph.of(model).locate()))
    if unknown:
        raise TLNoiseValueError(f"scores name {unknown[:5]}, which are not edges of this model")


def rank_edges(scores: Mapping[str, float], edges: Sequence[str]) -> list[str]:
    """``edges`` by score, highest first (unscored last); ties keep ``edges``' order."""
    index = {e: i for i, e in enumerate(edges)}
    return sorted(edges, key=lambda e: (-scores.get(e, -math.inf), index[e]))


def smallest_prefix(f: Callable[[int], float], n: int, target: float) -> int:
    """The smallest ``k`` with ``f(k) >= target`` found by a doubling scan then bisection
    (``f(n)`` is taken to reach it)."""
    low, k = 0, 1
    while k < n and f(k) < target:
        low, k = k, min(n, 2 * k)
    high = k  # f(high) >= target (or high == n)
    while high - low > 1:
        mid = (low + high) // 2
        if f(mid) >= target:
            high = mid
        else:
            low = mid
    return high


def extract_circuit(
    scores: Mapping[str, float],
    model: Any,
    tokens: Int[Tensor, "n pos"],
    target: float = 0.9,
    loss_mask: Bool[Tensor, "n pos"] | None = None,
    ablation: str = "mean",
    corrupted_tokens: Int[Tensor, "n pos"] | None = None,
    metric: Metric | None = None,
    prune_budget: int = 200,
    batch_size: int = 32,
    targets: Int[Tensor, "n pos"] | None = None,
) -> ExtractedCircuit:
    """The smallest edge circuit whose faithfulness (every other edge ablated) reaches
    ``target``, found from the ranking ``scores`` (``tn.edge_importance(noise)``) and verified by a
    forward pass (see the module doc; ``prune_budget``: the most forwards spent dropping edges).
    """
    if not (isinstance(target, (int, float)) and 0 < target <= 1):
        raise TLNoiseValueError(f"target={target!r}; expected a number in (0, 1]")
    if isinstance(prune_budget, bool) or not isinstance(prune_budget, int) or prune_budget < 0:
        raise TLNoiseValueError(f"prune_budget={prune_budget!r}; expected an int >= 0")
    check_edge_scores(scores, model)
    with EdgeCircuitEvaluator(
        model,
        tokens,
        loss_mask,
        ablation,
        corrupted_tokens,
        metric,
        batch_size=batch_size,
        targets=targets,
    ) as evaluator:
        ranked = rank_edges(scores, evaluator.edges)
        curve: dict[int, float] = {0: 0.0, len(ranked): 1.0}

        def f(k: int) -> float:
            if k not in curve:
                curve[k] = evaluator.faithfulness(ranked[:k])
            return curve[k]

        size = smallest_prefix(f, len(ranked), target)
        kept = ranked[:size]
        value = f(size)
        spent = 0
        for edge in reversed(ranked[:size]):
            if spent >= prune_budget or len(kept) <= 1:
                break
            trial = [e for e in kept if e != edge]
            spent += 1
            trial_value = evaluator.faithfulness(trial)
            if trial_value >= target:
                kept, value = trial, trial_value
        return ExtractedCircuit(kept, value, float(target), size, evaluator.forwards, curve)
