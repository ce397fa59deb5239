"""What every node-level baseline shares: its result type, the registry, the metric, the data
checks and the places (hook points) where nodes live.

**The metric** is :class:`~tl_noise.evaluation.nodes.CircuitEvaluator`'s: with ``T`` the target
positions (``loss_mask`` without the last position) of the evaluation set,

    m = (1 / |T|) * sum_{(i, t) in T} log p(tokens[i, t + 1] | run of the model on row i)

and the run may be on other tokens (a corrupted input) while ``m`` still scores the clean row's
next token. Gradient methods differentiate the per-batch share ``sum_{(i, t) in T ∩ B} ... / |T|``,
whose sum over batches is exactly ``m``.

**Cost** is counted in *forwards*: one forward = one forward pass of the model over the whole
evaluation set (``n`` rows). A pass over ``b`` rows counts ``b / n``; a backward pass counts as 2
forwards (the usual estimate: it multiplies by the transposes of the forward's matrices twice,
once for activations and once for inputs), so one optimisation step on ``b`` rows costs
``3 b / n``.

**Nodes** are MIB's ``a{l}.h{h}`` (a head's slice of ``blocks.{l}.attn.hook_z``) and ``m{l}``
(``blocks.{l}.hook_mlp_out``), in :func:`~tl_noise.evaluation.nodes.circuit_nodes` order.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tl_noise.errors import TLNoiseValueError
from tl_noise.evaluation.ablation import resampled_index
from tl_noise.evaluation.nodes import circuit_nodes, node_ranking
from tl_noise.hooks.targets import resolve_targets, target_positions
from tl_noise.names import parse_node


@dataclass(frozen=True)
class NodeScores:
    """A baseline's result.

    Attributes:
        scores: node -> importance, higher = more important; every node of the model.
        seconds: wall time of the whole call (statistics, reference runs and scoring).
        forwards: forward-pass equivalents over the evaluation set (module doc: a backward
            counts as 2 forwards, a pass over ``b`` of ``n`` rows as ``b / n``).
        details: method-specific extras (signed scores, the greedy path, final mask values...).
    """

    scores: dict[str, float]
    seconds: float
    forwards: float
    details: dict[str, Any] = field(default_factory=dict)

    def ranking(self) -> list[str]:
        """The nodes, most important first (ties keep node order)."""
        return node_ranking(self.scores, self.scores)


class NodeBaseline(Protocol):
    """``(model, tokens, loss_mask, corrupted_tokens=None, **settings) -> NodeScores``."""

    def __call__(
        self,
        model: Any,
        tokens: Int[Tensor, "n pos"],
        loss_mask: Bool[Tensor, "n pos"],
        corrupted_tokens: Int[Tensor, "n pos"] | None = None,
        **settings: Any,
    ) -> NodeScores: ...


class Stopwatch:
    """Wall time since construction: ``Stopwatch().seconds()``."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.start


def check_data(
    model: Any, tokens: Tensor, loss_mask: Tensor, targets: Tensor | None = None
) -> Int[Tensor, "n pos"]:
    """The evaluator's rules: ``loss_mask`` a bool tensor shaped like ``tokens`` that selects at
    least one position with a target (TLNoiseValueError otherwise). Returns the targets
    (:func:`tl_noise.hooks.targets.resolve_targets`: ``targets``, else the next tokens, else the
    clean model's argmax)."""
    if not isinstance(tokens, Tensor) or tokens.ndim != 2 or tokens.is_floating_point():
        raise TLNoiseValueError("tokens must be an integer tensor [n, pos]")
    if tokens.shape != loss_mask.shape or loss_mask.dtype != torch.bool:
        raise TLNoiseValueError(
            f"loss_mask must be a bool tensor shaped like the tokens {list(tokens.shape)}"
        )
    return resolve_targets(model, tokens, loss_mask, targets)


def counterfactual(
    tokens: Int[Tensor, "n pos"], corrupted_tokens: Tensor | None, seed: int = 0
) -> tuple[Int[Tensor, "n pos"], str]:
    """``(corrupted inputs, where they came from)``: ``corrupted_tokens`` checked against
    ``tokens``, or, when None, resampling: row ``i`` gets the tokens of row ``perm[i] != i``
    (:func:`~tl_noise.evaluation.ablation.resampled_index`)."""
    if corrupted_tokens is None:
        return tokens[resampled_index(tokens.shape[0], seed)], "resampled"
    if corrupted_tokens.shape != tokens.shape or corrupted_tokens.is_floating_point():
        raise TLNoiseValueError(
            f"corrupted_tokens must be integer token ids shaped like the tokens "
            f"{list(tokens.shape)}, got {corrupted_tokens.dtype} {list(corrupted_tokens.shape)}"
        )
    return corrupted_tokens, "given"


def target_mask(loss_mask: Bool[Tensor, "b pos"], targets: Int[Tensor, "b pos"]) -> Bool[
        Tensor, "b pos"]:  # fmt: skip
    """Positions ``t`` whose prediction counts (``loss_mask`` where there is a target, as in the
    evaluator: with next-token targets the last position has none)."""
    return target_positions(loss_mask, targets)


def target_log_probs(
    logits: Float[Tensor, "b pos vocab"], targets: Int[Tensor, "b pos"], loss_mask: Tensor
) -> Float[Tensor, " m"]:
    """``log p(targets[i, t])`` at every target position ``(i, t)`` (row-major order), the
    terms of the evaluator's metric."""
    keep = target_mask(loss_mask, targets)
    logp = F.log_softmax(logits[keep].float(), dim=-1)
    return logp.gather(-1, targets[keep][:, None]).squeeze(-1)


def n_targets(loss_mask: Tensor, targets: Tensor) -> int:
    """``|T|``, the number of target positions of the evaluation set."""
    return int(target_mask(loss_mask, targets).sum())


@dataclass(frozen=True)
class Site:
    """A hook point and the nodes living in it: the heads of a layer (``hook_z``, last-but-one
    axis) or the layer's MLP (``hook_mlp_out``)."""

    hook: str
    nodes: tuple[str, ...]
    index: tuple[int, ...]  # positions of ``nodes`` in the node list
    per_head: bool

    def gate(self, values: Float[Tensor, "b n_nodes"], act: Tensor) -> Tensor:
        """This site's columns of per-node ``values`` shaped to broadcast against ``act``:
        ``[b, 1, n_heads, 1]`` for ``hook_z``, ``[b, 1, 1]`` for ``hook_mlp_out``."""
        cols = values[:, list(self.index)].to(act.device, act.dtype)
        return cols[:, None, :, None] if self.per_head else cols[:, :, None]


def node_sites(model: Any) -> list[Site]:
    """The sites of every node of ``model``, in node order (per layer: heads, then the MLP)."""
    nodes = circuit_nodes(model)
    grouped: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        layer, head = parse_node(node)  # type: ignore[misc]  # circuit_nodes are all nodes
        hook = f"blocks.{layer}.hook_mlp_out" if head is None else f"blocks.{layer}.attn.hook_z"
        grouped.setdefault(hook, []).append(i)
    return [Site(hook, tuple(nodes[i] for i in index), tuple(index), hook.endswith("hook_z"))
            for hook, index in grouped.items()]  # fmt: skip


@torch.no_grad()
def capture(model: Any, tokens: Tensor, sites: list[Site]) -> tuple[Tensor, dict[str, Tensor]]:
    """``(logits, hook -> activation)`` of one run on ``tokens`` (no grad, activations cloned)."""
    acts: dict[str, Tensor] = {}

    def keep(name: str) -> Callable[..., None]:
        return lambda act, hook: acts.__setitem__(name, act.detach().clone())

    logits = model.run_with_hooks(tokens, fwd_hooks=[(s.hook, keep(s.hook)) for s in sites])
    return logits, acts


def minibatches(n: int, batch_size: int, steps: int, seed: int) -> list[Tensor]:
    """``steps`` random row indices of size ``min(batch_size, n)`` (fresh permutation per epoch)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise TLNoiseValueError(f"batch_size={batch_size!r}; expected an int >= 1")
    size = min(batch_size, n)
    gen = torch.Generator().manual_seed(seed)
    out: list[Tensor] = []
    order = torch.randperm(n, generator=gen)
    at = 0
    while len(out) < steps:
        if at + size > n:
            order, at = torch.randperm(n, generator=gen), 0
        out.append(order[at : at + size])
        at += size
    return out
