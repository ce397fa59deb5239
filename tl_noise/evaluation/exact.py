"""The exact circuit optimum of a small model: MIB faithfulness ``f(C)`` of every node subset.

With ``N <= MAX_EXACT_NODES`` nodes (heads ``a{l}.h{h}``, MLPs ``m{l}``) every circuit ``C`` is
scored as :class:`~tl_noise.evaluation.nodes.CircuitEvaluator` scores it: the nodes outside ``C``
mean-ablated, ``m(C)`` the mean log-prob of the true next token at the ``loss_mask`` positions,
``f(C) = (m(C) - m(empty)) / (m(N) - m(empty))``. From the table: ``f*(k) = max_{|C| = k} f(C)``
(:func:`optimum_curve`), ``k90* = min{k : f*(k) >= 0.9}`` (:func:`k90_star`) and its best set
(:func:`minimal_circuit`); the ranking ceiling (:func:`ranking_ceiling`), the nested chain
``{} = C_0 ⊂ C_1 ⊂ ... ⊂ C_N`` (one ranking) maximising ``sum_k f(C_k)``; and
:func:`judge_ranking`, a method's ranking against both, with MIB's CPR and CMD.

Cost. The residual stream after layer ``l`` depends only on the circuit restricted to layers
``<= l``, so the layers run over *prefix states*: layer ``l``'s attention runs once per circuit
over the layers ``< l``, giving components ``D_h = (z_h - mean z_h) W_O[h]`` per head and the
base ``D_b = x + b_O + sum_h mean(z_h) W_O[h]``; head subset ``c`` of the layer is then
``x_c = D_b + sum_h keep[c, h] D_h`` (one small matmul for all ``c``), and the MLP runs once per
state (kept: ``+ MLP(x_c)``, ablated: ``+ mean``). The last layer works at the target positions
only (keys and values at all), where ``LN(x_c) W + b = (sum_j keep[c, j] P(D_j) W~) / sigma(x_c)
+ beta`` (``P`` centring, ``W~ = diag(w_LN) W``, ``beta = b_LN W + b``) replaces a matmul per
subset by one per component. The forward is computed from the weights (TL 3.x
``HookedTransformer`` or the 4.x native bridge of :func:`tl_noise.models.build_native_model`:
LN / LNPre / RMS / none, standard positions, gelu / gelu_new / relu / silu) and checked against
the model's own hooked forwards on ``m(N)`` and ``m(empty)``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from tl_noise.devices import model_device
from tl_noise.errors import TLNoiseValueError
from tl_noise.evaluation.exact_forward import (
    ACTIVATION_FLOATS,
    _example_chunks,
    _plan,
    _Run,
    _targets,
    _weights,
)
from tl_noise.evaluation.metrics import roc_auc
from tl_noise.evaluation.nodes import CircuitEvaluator, circuit_nodes
from tl_noise.hooks.targets import output_vocab, target_positions
from tl_noise.io import read_json, read_tensors, write_json, write_tensors

MAX_EXACT_NODES = 20
"""The most nodes :func:`exhaustive_faithfulness` accepts (``2^20`` circuits)."""
CHECK_TOL = 1e-4
"""Largest ``|m - m_model| / (1 + |m_model|)`` allowed on ``m(N)`` and ``m(empty)`` against the
model's own forwards (which take the log-softmax in float32)."""


# --------------------------------------------------------------------------------- the table
@dataclass
class ExactTable:
    """``f(C)`` of every subset ``C`` of ``nodes``, indexed by bitmask (bit ``i`` set: ``nodes[i]``
    kept); ``metric``: the raw ``m(C)``; ``clean_metric = m(N)``, ``empty_metric = m(empty)``."""

    nodes: list[str]
    f: Float[Tensor, " subsets"]
    metric: Float[Tensor, " subsets"]
    clean_metric: float
    empty_metric: float
    info: dict[str, Any] = field(default_factory=dict)

    def mask_of(self, subset: Collection[str]) -> int:
        """The bitmask of a node subset (ValueError naming nodes not in the table)."""
        unknown = sorted(set(subset) - set(self.nodes))
        if unknown:
            raise TLNoiseValueError(f"nodes {unknown} are not among the table's {self.nodes}")
        return sum(1 << i for i, n in enumerate(self.nodes) if n in set(subset))

    def f_of(self, subset: Collection[str]) -> float:
        """``f(C)`` of the node subset ``C``."""
        return float(self.f[self.mask_of(subset)])

    def save(self, path: str | Path) -> None:
        """Write the folder ``path``: ``exact_table.safetensors`` (f, metric) and ``.json``."""
        Path(path).mkdir(parents=True, exist_ok=True)
        write_tensors(Path(path, "exact_table.safetensors"), {"f": self.f, "metric": self.metric})
        write_json(
            Path(path, "exact_table.json"),
            {
                "nodes": self.nodes,
                "info": self.info,
                "clean_metric": self.clean_metric,
                "empty_metric": self.empty_metric,
            },
        )

    @classmethod
    def load(cls, path: str | Path) -> ExactTable:
        """Read a table written by :meth:`save` (ValueError naming a damaged file)."""
        meta = read_json(Path(path, "exact_table.json"), "exact table")
        tensors = read_tensors(Path(path, "exact_table.safetensors"), "exact table")
        try:
            nodes, size = list(meta["nodes"]), 1 << len(meta["nodes"])
            table = cls(nodes, tensors["f"], tensors["metric"], float(meta["clean_metric"]),
                        float(meta["empty_metric"]), dict(meta["info"]))  # fmt: skip
        except (KeyError, TypeError, ValueError) as err:
            raise TLNoiseValueError(f"exact table {str(path)!r} lacks {err}") from err
        if table.f.shape != (size,) or table.metric.shape != (size,):
            raise TLNoiseValueError(f"exact table {str(path)!r} does not hold 2^{len(nodes)} "
                                    f"values of f and metric for its nodes")  # fmt: skip
        return table


def _check_nodes(model: Any, nodes: Sequence[str] | None) -> list[str]:
    every = circuit_nodes(model)
    nodes = list(every if nodes is None else nodes)
    unknown = [n for n in nodes if n not in every]
    if unknown or len(set(nodes)) != len(nodes):
        raise TLNoiseValueError(f"nodes must be distinct nodes of the model ({every}); got "
                                f"{unknown or 'duplicates'}")  # fmt: skip
    if len(nodes) > MAX_EXACT_NODES:
        raise TLNoiseValueError(f"{len(nodes)} nodes: exhaustive_faithfulness scores all 2^N "
                                f"circuits and accepts at most MAX_EXACT_NODES = "
                                f"{MAX_EXACT_NODES}; pass fewer nodes")  # fmt: skip
    return nodes


@torch.no_grad()
def exhaustive_faithfulness(
    model: Any, tokens: Int[Tensor, "n pos"], loss_mask: Bool[Tensor, "n pos"],
    nodes: Sequence[str] | None = None, batch_size: int | None = None, progress: bool = True,
    dtype: torch.dtype = torch.float32, targets: Int[Tensor, "n pos"] | None = None,
) -> ExactTable:  # fmt: skip
    """``f(C)`` for all ``2^N`` subsets ``C`` of ``nodes`` (default every head and MLP) as
    :class:`CircuitEvaluator` defines it (nodes not listed are never ablated), for about the
    cost of ``2^(N - 1)`` passes of the last layer's MLP over the target positions.

    ``batch_size``: circuits run together per layer step, all examples at once (memory grows
    with it times ``n * pos * max(d_mlp, n_heads * d_model, d_vocab)``); None: examples and
    circuits batched so that no activation exceeds ``ACTIVATION_FLOATS``. ``m(N)`` and
    ``m(empty)`` are checked against the model's own hooked forwards (``CHECK_TOL``).
    """
    nodes = _check_nodes(model, nodes)
    began = time.perf_counter()
    ev = CircuitEvaluator(model, tokens, loss_mask, nodes, targets=targets)  # means, m(N), m(0)
    targets = ev.targets.to(model_device(model))
    cfg, device = model.cfg, model_device(model)
    w_e, w_pos, layers, final = _weights(model, dtype)
    plan = _plan(model, nodes, ev.means, dtype, device)
    tokens, loss_mask = tokens.to(device), loss_mask.to(device)
    n_targets = int(target_positions(loss_mask, targets).sum())
    sums = torch.zeros(1 << len(nodes), dtype=torch.float64)
    widest = max(int(cfg.d_mlp or 0), int(cfg.n_heads) * int(cfg.d_model), output_vocab(model))
    rows = ACTIVATION_FLOATS // widest
    chunks = [slice(None)] if batch_size else _example_chunks(model, tokens, nodes, rows)
    with tqdm(total=len(sums) * n_targets, disable=not progress, desc="circuits x targets",
              leave=False) as bar:  # fmt: skip
        for chunk in chunks:
            run = _Run(layers, plan, final, rows, batch_size, bar, sums,
                       _targets(targets[chunk], loss_mask[chunk]))  # fmt: skip
            if len(run.target[2]):
                embedded = (w_e[tokens[chunk]] + w_pos[: tokens.shape[1]])[None]
                run.layer(0, embedded, torch.zeros(1, dtype=torch.long, device=device))
    metric = sums / n_targets
    clean, empty = float(metric[-1]), float(metric[0])
    err = max(abs(clean - ev.clean_metric) / (1 + abs(ev.clean_metric)),
              abs(empty - ev.empty_metric) / (1 + abs(ev.empty_metric)))  # fmt: skip
    if not err <= CHECK_TOL:
        raise TLNoiseValueError(
            f"the exact computation is off the model's own forward by "
            f"{err:.3g} (relative) in m(N) or m(empty): exhaustive_"
            "faithfulness does not reproduce this model's configuration"
        )
    info = {"n_examples": int(tokens.shape[0]), "n_targets": n_targets, "dtype": str(dtype),
            "seconds": time.perf_counter() - began}  # fmt: skip
    return ExactTable(nodes, (metric - empty) / (clean - empty), metric, clean, empty, info)


def compute_and_save(model: Any, tokens: Int[Tensor, "n pos"], mask: Bool[Tensor, "n pos"],
                     path: str | Path, **kwargs: Any) -> ExactTable:  # fmt: skip
    """:func:`exhaustive_faithfulness` written to the folder ``path`` (:meth:`ExactTable.save`)."""
    table = exhaustive_faithfulness(model, tokens, mask, **kwargs)
    table.save(path)
    return table


# ------------------------------------------------------------------- the optimum and rankings
def _by_size(n: int) -> list[Tensor]:
    """The bitmasks of ``n`` bits with ``k`` bits set, for ``k = 0..n``."""
    sizes = ((torch.arange(1 << n)[:, None] >> torch.arange(n)) & 1).sum(1)
    return [(sizes == k).nonzero().flatten() for k in range(n + 1)]


def optimum_curve(table: ExactTable) -> tuple[Float[Tensor, " k"], list[list[str]]]:
    """``f*(k) = max_{|C| = k} f(C)`` for ``k = 0..N``, and a best set of each size (of tied
    sets, the lowest bitmask)."""
    best = [int(level[table.f[level].argmax()]) for level in _by_size(len(table.nodes))]
    sets = [[node for i, node in enumerate(table.nodes) if m >> i & 1] for m in best]
    return table.f[best].double(), sets


def ranking_curve(table: ExactTable, ranking: Sequence[str]) -> Float[Tensor, " k"]:
    """``f(top_k)`` for ``k = 0..N`` of a ranking (each node of the table once, best first)."""
    if sorted(ranking) != sorted(table.nodes):
        raise TLNoiseValueError(f"a ranking must list each of the table's nodes {table.nodes} "
                                f"once; got {list(ranking)}")  # fmt: skip
    masks = torch.tensor([0] + [1 << table.nodes.index(n) for n in ranking]).cumsum(0)
    return table.f[masks].double()


def ranking_ceiling(table: ExactTable) -> tuple[list[str], Float[Tensor, " k"]]:
    """The ranking maximising ``sum_{k=0..N} f(top_k)``, and its curve: the best nested chain,
    by ``dp[S] = f(S) + max_{i in S} dp[S minus i]`` over the subsets by size, ``dp[{}] = 0``
    (``O(2^N N)``; of tied last nodes of a set, the lowest index)."""
    n, f = len(table.nodes), table.f.double()
    dp, arg, bits = f.clone(), torch.zeros(1 << n, dtype=torch.long), 1 << torch.arange(n)
    for level in _by_size(n)[1:]:
        has = (level[:, None] & bits) != 0
        value, arg[level] = dp[level[:, None] ^ bits].masked_fill(~has, -math.inf).max(1)
        dp[level] = f[level] + value
    mask, chain = (1 << n) - 1, []
    while mask:  # the node added last to S is arg[S]
        chain.append(table.nodes[int(arg[mask])])
        mask ^= 1 << int(arg[mask])
    return chain[::-1], ranking_curve(table, chain[::-1])


def k90_star(table: ExactTable, threshold: float = 0.9) -> int | None:
    """``k90* = min{k : f*(k) >= threshold}`` (None if no set reaches it)."""
    reached = (optimum_curve(table)[0] >= threshold).nonzero()
    return int(reached[0]) if len(reached) else None


def minimal_circuit(table: ExactTable, threshold: float = 0.9) -> list[str] | None:
    """The best set of size ``k90*``: a smallest circuit with ``f >= threshold``."""
    k = k90_star(table, threshold)
    return None if k is None else optimum_curve(table)[1][k]


def mib_areas(curve: Float[Tensor, " k"]) -> tuple[float, float]:
    """MIB's ``(CPR, CMD)`` of a curve ``f_k = f(top_k)``, ``k = 0..N``: trapezoid areas over the
    fraction of the graph ``x_k = k / N``, ``CPR = sum_{k<N} (f_k + f_{k+1}) / (2N)`` and
    ``CMD = sum_{k<N} (|1 - f_k| + |1 - f_{k+1}|) / (2N)``. (MIB samples ``x`` at fixed
    percentages of a big graph, from 0.1 %; on a small graph every size ``k`` is a point.)"""
    f, gap, n = curve.double(), (1 - curve.double()).abs(), len(curve) - 1
    return float((f[:-1] + f[1:]).sum() / (2 * n)), float((gap[:-1] + gap[1:]).sum() / (2 * n))


def judge_ranking(table: ExactTable, ranking: Sequence[str],
                  scores: Mapping[str, float] | Sequence[float] | Tensor | None = None,
                  threshold: float = 0.9) -> dict[str, Any]:  # fmt: skip
    """A ranking (most important first) against the exact optimum, as a JSON-ready dict.

    ``curve``: ``f(top_k)``, ``k = 0..N``; ``area_ratio = sum_k f(top_k) / sum_k f*(k)`` and
    ``ceiling_ratio = sum_k f(top_k) / sum_k f(ceiling_k)`` (against the best single ranking,
    :func:`ranking_ceiling`; with positive areas ``area_ratio <= ceiling_ratio <= 1``, ``f*``
    being no chain in general); ``cpr``, ``cmd``
    (:func:`mib_areas`; ``ceiling_cpr``, ``ceiling_cmd`` of the ceiling); ``k90 = min{k :
    f(top_k) >= threshold}`` (None if never) beside ``k90_star``; ``roc_auc`` of ``scores`` (by
    node, or in the table's node order; default ``N - rank``) against membership of the
    :func:`minimal_circuit` (None when that holds every node).
    """
    curve, (optimum, _) = ranking_curve(table, ranking), optimum_curve(table)
    ceiling, ceiling_curve = ranking_ceiling(table)
    reached, minimal = (curve >= threshold).nonzero(), minimal_circuit(table, threshold) or []
    if scores is None:
        scores = {node: float(len(ranking) - i) for i, node in enumerate(ranking)}
    values = [scores[n] for n in table.nodes] if isinstance(scores, Mapping) else scores
    labels = torch.tensor([n in minimal for n in table.nodes])
    (cpr, cmd), (ceiling_cpr, ceiling_cmd) = mib_areas(curve), mib_areas(ceiling_curve)
    auc = (roc_auc(torch.as_tensor(values, dtype=torch.float64), labels)
           if 0 < int(labels.sum()) < len(labels) else None)  # fmt: skip
    return {
        "curve": curve.tolist(), "optimum": optimum.tolist(), "ceiling_ranking": ceiling,
        "ceiling_curve": ceiling_curve.tolist(),
        "area_ratio": float(curve.sum() / optimum.sum()),
        "ceiling_ratio": float(curve.sum() / ceiling_curve.sum()), "cpr": cpr, "cmd": cmd,
        "ceiling_cpr": ceiling_cpr, "ceiling_cmd": ceiling_cmd,
        "k90": int(reached[0]) if len(reached) else None, "k90_star": k90_star(table, threshold),
        "minimal_circuit": minimal, "roc_auc": auc,
    }  # fmt: skip
