"""Circuits of nodes (heads ``a{l}.h{h}`` and MLPs ``m{l}``) judged with everything else ablated.

A circuit ``C`` is a set of nodes; every node outside it is *mean-ablated*: a head's slice of
``blocks.{l}.attn.hook_z`` and an MLP's ``blocks.{l}.hook_mlp_out`` are replaced by their mean over
every example and position of the evaluation set. The metric is the mean log-probability of the
target at the task's ``loss_mask`` positions (the true next token, or the task's own targets:
:mod:`tl_noise.hooks.targets`), and MIB's normalised faithfulness is

    f(C) = (m(C) - m(empty)) / (m(N) - m(empty))

with ``N`` the full model (1: the circuit does everything the model does) and ``empty`` every node
ablated. :class:`CircuitEvaluator` also reports ``KL(p_N || p_C)`` at the same positions and counts
the forward passes it ran, the cost unit of the methods compared in ``benchmarks/``.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Int
from torch import Tensor

from tl_noise.devices import model_device
from tl_noise.errors import TLNoiseValueError
from tl_noise.hooks.ablation import (
    FwdHooks,
    ablation_hooks,
    circuit_nodes,
    eval_batches,
    has_mlps,
    node_means,
)
from tl_noise.hooks.targets import resolve_targets, target_log_probs, target_positions

__all__ = [
    "CircuitEvaluator",
    "FwdHooks",
    "ablation_hooks",
    "circuit_nodes",
    "has_mlps",
    "node_means",
    "node_ranking",
]


class CircuitEvaluator:
    """Faithfulness of node sets on one evaluation set (means, clean and empty metrics cached).

    Args:
        model: a TransformerLens model (4.x bridge or 3.x ``HookedTransformer``).
        tokens: ``[n, pos]`` evaluation tokens; ``loss_mask``: ``[n, pos]`` bool target
            positions (the prediction at ``t`` of token ``t + 1`` counts).
        nodes: the nodes a circuit is chosen from (default every head and MLP).
        targets: ``[n, pos]`` what each prediction is judged against (default: the next token,
            or the clean model's argmax when its outputs are not input tokens;
            :func:`~tl_noise.hooks.targets.resolve_targets`).
    """

    def __init__(
        self,
        model: Any,
        tokens: Int[Tensor, "n pos"],
        loss_mask: Bool[Tensor, "n pos"],
        nodes: Collection[str] | None = None,
        batch_size: int = 64,
        targets: Int[Tensor, "n pos"] | None = None,
    ) -> None:
        if tokens.shape != loss_mask.shape or loss_mask.dtype != torch.bool:
            raise TLNoiseValueError(
                f"loss_mask must be a bool tensor shaped like the tokens {list(tokens.shape)}"
            )
        self.targets = resolve_targets(model, tokens, loss_mask, targets, batch_size)
        self.model, self.tokens, self.mask = model, tokens, loss_mask
        self.nodes = list(nodes) if nodes is not None else circuit_nodes(model)
        self.batch_size = batch_size
        self.forwards = 0  # forward passes over the evaluation set (one per circuit scored)
        self.means = node_means(model, tokens, batch_size)
        self.clean_logp = self._log_probs([])  # per target position, the full model
        self.clean_metric = float(self.clean_logp.mean())
        self.empty_metric = self.metric([])
        if not abs(self.clean_metric - self.empty_metric) > 1e-9:
            raise TLNoiseValueError(
                "ablating every node leaves the metric at "
                f"{self.clean_metric:.6g}: faithfulness is undefined on this task"
            )

    @torch.no_grad()
    def _log_probs(self, ablated: Iterable[str], kl_with: Tensor | None = None) -> Tensor:
        hooks = ablation_hooks(self.means, ablated)
        device = model_device(self.model)
        parts = []
        for index in eval_batches(self.tokens.shape[0], self.batch_size):
            tokens, mask = self.tokens[index].to(device), self.mask[index].to(device)
            logits = self.model.run_with_hooks(tokens, fwd_hooks=hooks)
            parts.append(target_log_probs(logits, self.targets[index].to(device), mask))
        self.forwards += 1
        return torch.cat(parts)

    def _ablated(self, keep: Collection[str]) -> list[str]:
        unknown = [n for n in keep if n not in self.nodes]
        if unknown:
            raise TLNoiseValueError(f"nodes {unknown} are not among this evaluator's nodes")
        return [n for n in self.nodes if n not in keep]

    def metric(self, keep: Collection[str]) -> float:
        """``m(C)``: mean log-prob of the target (the true next token, by default) with every
        node outside ``keep`` mean-ablated."""
        return float(self._log_probs(self._ablated(keep)).mean())

    def faithfulness(self, keep: Collection[str]) -> float:
        """MIB's ``f(C) = (m(C) - m(empty)) / (m(N) - m(empty))``."""
        return (self.metric(keep) - self.empty_metric) / (self.clean_metric - self.empty_metric)

    @torch.no_grad()
    def kl(self, keep: Collection[str]) -> float:
        """``KL(p_N || p_C)`` of the output distributions, averaged over target positions."""
        hooks = ablation_hooks(self.means, self._ablated(keep))
        device = model_device(self.model)
        total, count = 0.0, 0
        for index in eval_batches(self.tokens.shape[0], self.batch_size):
            tokens, mask = self.tokens[index].to(device), self.mask[index].to(device)
            keep_pos = target_positions(mask, self.targets[index].to(device))
            clean = F.log_softmax(self.model(tokens)[keep_pos].float(), -1)
            circuit = F.log_softmax(
                self.model.run_with_hooks(tokens, fwd_hooks=hooks)[keep_pos].float(), -1
            )
            total += float(F.kl_div(circuit, clean, log_target=True, reduction="sum"))
            count += int(keep_pos.sum())
        self.forwards += 2
        return total / count

    def curve(self, ranking: list[str]) -> list[float]:
        """``f(top_k)`` for k = 0..len(ranking) (one forward pass per k)."""
        return [self.faithfulness(ranking[:k]) for k in range(len(ranking) + 1)]


def node_ranking(scores: dict[str, float], nodes: Iterable[str]) -> list[str]:
    """``nodes`` sorted by score, highest first; ties (and missing or NaN scores, which count as
    lowest) keep the given node order."""
    order = list(nodes)

    def key(item: tuple[int, str]) -> tuple[float, int]:
        value = scores.get(item[1], float("-inf"))
        value = float("-inf") if value != value else value  # NaN -> lowest
        return (-value, item[0])

    return [node for _, node in sorted(enumerate(order), key=key)]
