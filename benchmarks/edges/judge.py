"""How an edge ranking is judged: ``f`` of its top ``k`` edges at MIB's edge fractions, MIB's
CPR and CMD, the circuit :func:`tl_noise.extract_circuit` finds, and ROC AUC against edge labels
derived from the node labels.

**Curve.** For every fraction ``x`` of :data:`~tl_noise.fitting.edge_curve.EDGE_FRACTIONS`
(0.001 ... 1) the top ``k = int(x N)`` edges of the ranking are kept (``N`` edges in the graph;
``int`` as MIB's ``apply_topn``, so ``k = 0`` at the smallest fractions of a small graph, where
``f = 0`` by definition) and every other edge is ablated
(:class:`~tl_noise.edges.EdgeCircuitEvaluator`: mean over the evaluation set, or the
corrupted input's contribution); ``f = (m(C) - m(empty)) / (m(all) - m(empty))`` with ``m`` the
mean log-probability of the true next token at the target positions. Unlike MIB we do not prune
edges left dangling by the top-k cut (``prune=True`` in MIB's ``apply_topn``): the prefix is
judged as ranked, the same edge set :func:`~tl_noise.extract_circuit` would verify.

**Areas** (as ``evaluate_area_under_curve`` in MIB's ``run_evaluation.py``): trapezoids over the
fraction axis between consecutive fractions, ``CPR = sum (x_{i+1} - x_i) (f_i + f_{i+1}) / 2`` and
``CMD = sum (x_{i+1} - x_i) (|1 - f_i| + |1 - f_{i+1}|) / 2``, on the linear axis (MIB's code
computes ``log x`` but its trapezoids use the linear fractions); the axis spans 0.001 .. 1, so a
perfect curve has CPR 0.999 and CMD 0. The intervals above 20 % of the graph carry 80 % of the
weight.

**Labels.** The zoo models label nodes, not edges. An edge is labelled positive when both its
ends are in the node-level minimal circuit (the best node set reaching ``f >= 0.9``, from the
shipped exact table of all node subsets), ``input`` and ``logits`` counting as members: a
superset of the edges the circuit needs (some of its q/k edges may not matter), so the AUC
measures whether a ranking puts the minimal circuit's internal edges above the rest, not
whether it finds the exact edge circuit.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

import tl_noise as tn
from tl_noise.edges import EdgeCircuitEvaluator
from tl_noise.edges.circuit import rank_edges
from tl_noise.evaluation import exact
from tl_noise.evaluation.metrics import roc_auc
from tl_noise.fitting.edge_curve import EDGE_FRACTIONS
from tl_noise.zoo import EVAL_N, exact_table_path


def mib_sizes(n_edges: int) -> list[int]:
    """``int(x N)`` for MIB's edge fractions ``x``."""
    return [int(x * n_edges) for x in EDGE_FRACTIONS]


def mib_areas(values: Sequence[float]) -> tuple[float, float]:
    """``(CPR, CMD)`` of ``f`` at :data:`EDGE_FRACTIONS` (see the module doc)."""
    cpr = cmd = 0.0
    for i in range(len(EDGE_FRACTIONS) - 1):
        width = EDGE_FRACTIONS[i + 1] - EDGE_FRACTIONS[i]
        cpr += width * (values[i] + values[i + 1]) / 2
        cmd += width * (abs(1 - values[i]) + abs(1 - values[i + 1])) / 2
    return cpr, cmd


def curve(evaluator: EdgeCircuitEvaluator, scores: Mapping[str, float]) -> dict[str, Any]:
    """``f`` of the top ``int(x N)`` edges of ``scores`` at MIB's fractions, CPR and CMD."""
    ranked = rank_edges(scores, evaluator.edges)
    sizes = mib_sizes(len(ranked))
    cache: dict[int, float] = {0: 0.0}
    values = []
    for k in sizes:
        if k not in cache:
            cache[k] = evaluator.faithfulness(ranked[:k])
        values.append(cache[k])
    cpr, cmd = mib_areas(values)
    return {"k": sizes, "f": values, "cpr": cpr, "cmd": cmd}


def extract(model: Any, tokens: Any, mask: Any, scores: Mapping[str, float]) -> dict[str, Any]:
    """:func:`tl_noise.extract_circuit` at ``f >= 0.9`` (mean ablation, its defaults)."""
    began = time.perf_counter()
    circuit = tn.extract_circuit(scores, model, tokens, target=0.9, loss_mask=mask)
    return {"edges": len(circuit.edges), "prefix": circuit.prefix,
            "faithfulness": circuit.faithfulness, "forwards": circuit.forwards,
            "seconds": time.perf_counter() - began, "circuit": circuit.edges}  # fmt: skip


def edge_labels(name: str, n_examples: int, edges: Sequence[str]) -> dict[str, Any] | None:
    """Positive edges of a zoo model (see the module doc); None without a shipped exact table
    for this evaluation set."""
    folder = exact_table_path(name)
    if n_examples != EVAL_N or not (folder / "exact_table.json").is_file():
        return None
    minimal = exact.minimal_circuit(exact.ExactTable.load(folder)) or []
    members = set(minimal) | {"input", "logits"}
    positive = [e for e in edges if {e.split("->")[0], e.split("->")[1].split("<")[0]} <= members]
    return {"minimal_node_circuit": minimal, "positive": positive}


def edge_auc(scores: Mapping[str, float], edges: Sequence[str], positive: Sequence[str]) -> float:
    keep = set(positive)
    values = torch.tensor([scores.get(e, -float("inf")) for e in edges], dtype=torch.float64)
    values = torch.nan_to_num(values, neginf=-1e300)
    return roc_auc(values, torch.tensor([e in keep for e in edges]))
