"""In-context refinement of a fitted node ranking: exact, seeded by the noise, linear in N.

A ranking is judged with the rest of the model ablated: ``f(top_k)`` with every node outside the
top ``k`` mean-ablated. One-shot importance (noise fitted on the full model, attribution, single
ablations) is measured in the full model instead, so it misjudges nodes whose effect shows only
jointly (backup heads, cancelling heads). The refinement fixes that in context:

    kept = all nodes
    repeat N times:
        candidates = the ``window`` lowest-ranked nodes (by the noise) still in ``kept``
        remove the candidate whose removal leaves the metric m(kept \\ {c}) highest

and ranks nodes by the reverse of the removal order (last removed = most important). Then
*insertion moves* polish it (:func:`polish_ranking`): moving the node at position ``j`` up to
position ``k < j`` changes only the top-k sets of sizes ``k+1 .. j``, so a move whose summed
metric over those prefixes is higher raises the ranking's area and lowers nothing else; for each
``k`` the best of the next ``POLISH_WINDOW - 1`` nodes is moved up when it helps, for up to
``POLISH_PASSES`` passes (each prefix set evaluated once). With
``window = N`` this is exact greedy backward elimination (ACDC-style, ~N^2/2 forward passes);
with a small window it costs ``~N * window`` passes, so it grows linearly with the number of
nodes, and the noise ranking decides which nodes are worth trying (the polish adds about
``(POLISH_WINDOW^2 / 2 + 1) N`` passes per pass over the ranking). ``budget`` caps the passes of
both; past it the remaining order follows the noise ranking, or the ranking stays as it is.

The metric ``m`` is the task's own metric when the fit optimised one (``-metric``, as metrics are
losses), else the mean log-probability of the target at the loss-mask positions (the true next
token, the task's ``targets`` extra, or the clean prediction of a model whose outputs are not
input tokens: :func:`tl_noise.hooks.targets.resolve_targets`); ablation means are taken over
every example and position of the refinement set.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from tl_noise.devices import model_device
from tl_noise.errors import TLNoiseValueError
from tl_noise.fitting.callbacks import Callback
from tl_noise.hooks import NoiseHooks, head_importance, std_node_scores
from tl_noise.hooks.ablation import ablation_hooks, eval_batches, node_means
from tl_noise.hooks.targets import TARGETS_KEY, resolve_targets, target_log_probs
from tl_noise.names import node_sort_key, parse_node

Metric = Callable[[Tensor, dict[str, Tensor]], Tensor]


class InContextMetric:
    """``m(C)`` on a fixed set of examples, every node outside ``C`` mean-ablated; counts the
    forward passes over the set it ran (``forwards``)."""

    def __init__(
        self,
        model: Any,
        tokens: Int[Tensor, "n pos"],
        mask: Bool[Tensor, "n pos"],
        nodes: Sequence[str],
        metric: Metric | None = None,
        extras: dict[str, Tensor] | None = None,
        batch_size: int = 64,
    ) -> None:
        self.model, self.tokens, self.mask = model, tokens, mask
        self.nodes = list(nodes)
        self.metric_fn, self.extras = metric, extras or {}
        self.batch_size = batch_size
        self.means = node_means(model, tokens, batch_size)
        self.targets = None
        if metric is None:
            given = self.extras.get(TARGETS_KEY)
            self.targets = resolve_targets(model, tokens, mask, given, batch_size)
        self.forwards = 0

    @torch.no_grad()
    def __call__(self, keep: Collection[str]) -> float:
        hooks = ablation_hooks(self.means, [n for n in self.nodes if n not in keep])
        device = model_device(self.model)
        total, count = 0.0, 0
        for index in eval_batches(self.tokens.shape[0], self.batch_size):
            tokens, mask = self.tokens[index].to(device), self.mask[index].to(device)
            logits = self.model.run_with_hooks(tokens, fwd_hooks=hooks)
            if self.targets is not None:
                logp = target_log_probs(logits, self.targets[index].to(device), mask)
                total, count = total + float(logp.sum()), count + logp.numel()
            else:
                assert self.metric_fn is not None
                batch = {"tokens": tokens, "loss_mask": mask, "index": index}
                batch.update({k: v[index].to(device) for k, v in self.extras.items()})
                total -= float(self.metric_fn(logits, batch)) * len(index)
                count += len(index)
        self.forwards += 1
        return total / max(count, 1)


@dataclass
class Refinement:
    """The refined ranking (most important first) and what it cost."""

    ranking: list[str]
    removal_order: list[str]
    metrics: list[float] = field(default_factory=list)  # m after each removal
    forwards: int = 0
    exhausted_budget: bool = False

    def scores(self) -> dict[str, float]:
        """``{node: N - rank}`` in node order (higher = more important)."""
        n = len(self.ranking)
        rank = {node: float(n - i) for i, node in enumerate(self.ranking)}
        return {node: rank[node] for node in sorted(rank, key=node_sort_key)}

    def info(self) -> dict[str, Any]:
        return {
            "method": "in-context backward elimination, then insertion moves",
            "removal_order": self.removal_order,
            "metrics": self.metrics,
            "forwards": self.forwards,
            "exhausted_budget": self.exhausted_budget,
        }


def refine_ranking(
    metric: InContextMetric, ranking: Sequence[str], window: int, budget: int | None = None
) -> Refinement:
    """Greedy backward elimination among the ``window`` lowest-ranked kept nodes (module doc).

    ``ranking``: node names, most important first (the noise's order); ``budget``: the most
    forward passes to spend (None: no cap).
    """
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise TLNoiseValueError(f"window={window!r}; expected an int >= 1")
    kept = list(ranking)
    removed: list[str] = []
    values: list[float] = []
    start = metric.forwards
    exhausted = False
    while len(kept) > 1:
        candidates = kept[-window:]
        if budget is not None and metric.forwards - start + len(candidates) > budget:
            exhausted = True
            break
        trials = [(metric([n for n in kept if n != c]), i, c) for i, c in enumerate(candidates)]
        best, _, node = max(trials, key=lambda t: (t[0], t[1]))  # ties: the lowest-ranked
        kept.remove(node)
        removed.append(node)
        values.append(best)
    # what the budget left unexamined keeps the noise's order, above everything removed
    order = kept + removed[::-1]
    return Refinement(order, removed, values, metric.forwards - start, exhausted)


POLISH_WINDOW = 4
POLISH_PASSES = 3


def _best_move(rank: list[str], k: int, window: int, m: Callable[[Sequence[str]], float]
               ) -> int | None:  # fmt: skip
    """The position ``j`` in ``k+1 .. k+window-1`` whose node, moved up to ``k``, raises the
    summed metric of the prefixes it changes the most (None: no move helps)."""
    best_gain, best_j = 0.0, None
    for j in range(k + 1, min(len(rank), k + window)):
        candidate = rank[:k] + [rank[j]] + rank[k:j]
        gain = sum(m(candidate[:i]) - m(rank[:i]) for i in range(k + 1, j + 1))
        if gain > best_gain + 1e-12 * (1 + abs(best_gain)):
            best_gain, best_j = gain, j
    return best_j


def polish_ranking(
    metric: InContextMetric, ranking: Sequence[str], window: int = POLISH_WINDOW,
    passes: int = POLISH_PASSES, budget: int | None = None,
) -> tuple[list[str], list[tuple[str, int, int]], int]:  # fmt: skip
    """Insertion moves that raise ``sum_k m(top_k)`` (module doc): ``(ranking, moves as (node,
    from, to), forwards spent)``; ``budget`` caps the forwards (None: no cap)."""
    rank, start = list(ranking), metric.forwards
    moves: list[tuple[str, int, int]] = []
    cache: dict[frozenset[str], float] = {}

    def m(nodes: Sequence[str]) -> float:
        key = frozenset(nodes)
        if key not in cache:
            cache[key] = metric(key)
        return cache[key]

    def spent() -> bool:
        return budget is not None and metric.forwards - start >= budget

    for _ in range(passes):
        moved = False
        for k in range(len(rank) - 1):
            if spent():
                return rank, moves, metric.forwards - start
            best_j = _best_move(rank, k, window, m)
            if best_j is not None:
                node = rank.pop(best_j)
                rank.insert(k, node)
                moves.append((node, best_j, k))
                moved = True
        if not moved:
            break
    return rank, moves, metric.forwards - start


def noise_ranking(noise: NoiseHooks) -> list[str]:
    """Noised nodes by ``-log std``, most important first; ties in node order."""
    scores = std_node_scores(noise)
    order = list(scores)  # node order
    return sorted(order, key=lambda n: (-scores[n], order.index(n)))


class RefineRanking(Callback):
    """At the end of a fit: refine the noise's node ranking in context (:func:`refine_ranking`)
    and record it with the noise (``noise.node_scores``, read by ``tn.node_importance``) and in
    the run. Skipped, with the reason recorded, when a noised hook is not a head or MLP node."""

    def __init__(self, window: int, examples: int, budget: int | None) -> None:
        self.window, self.examples, self.budget = window, examples, budget

    def on_fit_end(self, trainer: Any, result: Any) -> None:
        noise: NoiseHooks = trainer.noise
        if noise.kind != "nodes":  # edge circuits are refined by tn.extract_circuit
            noise.ranking_info = {"skipped": "edge noise (tn.extract_circuit refines circuits)"}
            return
        std_scores = std_node_scores(noise)
        info: dict[str, Any] = {"std_scores": std_scores, "window": self.window}
        others = [n for n in std_scores if parse_node(n) is None]
        if others:
            info["skipped"] = f"not head or MLP nodes: {others}"
            noise.node_scores, noise.ranking_info = None, info
            return
        data = trainer.data
        n = min(self.examples, len(data))
        uses_metric = trainer.config.objective_name not in ("kl", "ce")
        with noise.switched_off():
            metric = InContextMetric(
                trainer.model, data.tokens[:n], data.mask[:n], list(std_scores),
                data.metric if uses_metric else None,
                {k: v[:n] for k, v in data.extras.items()},
            )  # fmt: skip
            refined = refine_ranking(metric, noise_ranking(noise), self.window, self.budget)
            left = None if self.budget is None else max(0, self.budget - refined.forwards)
            ranking, moves, cost = polish_ranking(metric, refined.ranking, budget=left)
        refined.ranking, refined.forwards = ranking, refined.forwards + cost
        noise.node_scores = refined.scores()
        polish = {"window": POLISH_WINDOW, "moves": moves, "forwards": cost}
        noise.ranking_info = {**info, **refined.info(), "polish": polish, "examples": n}
        result.node_scores = dict(noise.node_scores)
        result.forwards += refined.forwards * n / len(data)
        result.importance = head_importance(noise)
