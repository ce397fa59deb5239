"""Circuits as files: MIB's circuit JSON, written and read back.

The format (MIB, Mueller et al. 2025; the leaderboard's ``Graph.to_json``)::

    {"cfg": {"n_layers", "n_heads", "d_model", "parallel_attn_mlp"},
     "nodes": {"input": {"score", "in_graph"}, "a0.h1": {...}, "m0": {...}, ..., "logits": {...}},
     "edges": {"input->a0.h1<q>": {"score", "in_graph"}, "a0.h1->m0": {...}, "m2->logits": {...}}}

Nodes are every head ``a{l}.h{h}`` and MLP ``m{l}`` of the model (no ``m{l}`` for an
attention-only model), plus ``input`` and ``logits``, which are always in the graph. Edges are
MIB's standard set: each writer (``input``, earlier heads and MLPs) to each later reader (a head's
``<q>``, ``<k>`` and ``<v>`` input, an MLP, ``logits``). A node-level circuit marks an edge
``in_graph`` when both its ends are; edge scores are 0 unless given.
"""

from __future__ import annotations

import math
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tl_noise.errors import TLNoiseTypeError, TLNoiseValueError
from tl_noise.io import read_json, write_json
from tl_noise.names import head_node, mlp_node, node_sort_key

ALWAYS_IN = ("input", "logits")


def mib_cfg(model: Any) -> dict[str, Any]:
    """The ``cfg`` MIB's loader needs, from a TransformerLens model (or a dict with the keys)."""
    cfg = model if isinstance(model, Mapping) else getattr(model, "cfg", None)
    if cfg is None:
        raise TLNoiseTypeError(f"expected a TransformerLens model or a cfg dict, got {model!r:.80}")

    def get(key: str, default: Any = None) -> Any:
        return cfg.get(key, default) if isinstance(cfg, Mapping) else getattr(cfg, key, default)

    return {
        "n_layers": int(get("n_layers")),
        "n_heads": int(get("n_heads")),
        "d_model": int(get("d_model")),
        "parallel_attn_mlp": bool(get("parallel_attn_mlp", False)),
        "attn_only": bool(get("attn_only", False)),
    }


def graph_nodes(cfg: Mapping[str, Any]) -> list[str]:
    """``input``, then per layer its heads and MLP, then ``logits`` (MIB's forward order)."""
    out = ["input"]
    for layer in range(cfg["n_layers"]):
        out += [head_node(layer, h) for h in range(cfg["n_heads"])]
        if not cfg.get("attn_only", False):
            out.append(mlp_node(layer))
    return out + ["logits"]


def graph_edges(cfg: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(edge name, parent)`` for MIB's standard edge set of ``cfg`` (see module doc)."""
    edges: list[tuple[str, str]] = []
    upstream = ["input"]
    for layer in range(cfg["n_layers"]):
        heads = [head_node(layer, h) for h in range(cfg["n_heads"])]
        for parent in upstream:
            edges += [(f"{parent}->{h}<{x}>", parent) for h in heads for x in "qkv"]
        if cfg.get("attn_only", False):
            upstream += heads
            continue
        mlp = mlp_node(layer)
        readers = upstream if cfg["parallel_attn_mlp"] else upstream + heads
        edges += [(f"{parent}->{mlp}", parent) for parent in readers]
        upstream += heads + [mlp]
    return edges + [(f"{parent}->logits", parent) for parent in upstream]


@dataclass
class Circuit:
    """A circuit read from (or about to be written to) a MIB circuit file."""

    cfg: dict[str, Any]
    node_scores: dict[str, float]
    nodes_in_graph: set[str]
    edge_scores: dict[str, float] = field(default_factory=dict)
    edges_in_graph: set[str] = field(default_factory=set)

    def ranking(self) -> list[str]:
        """Scored heads and MLPs, highest score first; ties in node order."""
        nodes = [n for n in self.node_scores if n not in ALWAYS_IN]
        return sorted(nodes, key=lambda n: (-self.node_scores[n], node_sort_key(n)))


def _select(
    ranked: list[str],
    known: list[str],
    size: int | None,
    circuit: Collection[str] | None,
    what: str,
    everything: set[str],
) -> set[str]:
    """The circuit's members: ``circuit`` (names among ``known``), the top ``size`` of
    ``ranked``, or (neither given) ``everything``."""
    if circuit is not None and size is not None:
        raise TLNoiseValueError("give size= or circuit=, not both")
    if circuit is not None:
        unknown = sorted(set(circuit) - set(known))
        if unknown:
            raise TLNoiseValueError(f"circuit {what}s {unknown[:5]} are not {what}s of this model")
        return set(circuit)
    if size is None:
        return everything
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= len(ranked):
        raise TLNoiseValueError(f"size={size!r}; expected an int in [0, {len(ranked)}]")
    return set(ranked[:size])


def _circuit_of(scores: Mapping[str, float], size: int | None, circuit: Collection[str] | None,
                nodes: list[str]) -> set[str]:  # fmt: skip
    inner = [n for n in nodes if n not in ALWAYS_IN]
    ranked = sorted(inner, key=lambda n: (-scores.get(n, -math.inf), node_sort_key(n)))
    return _select(ranked, inner, size, circuit, "node", set(inner))


def save_circuit(
    scores: Mapping[str, float],
    path: str | os.PathLike[str],
    model: Any,
    size: int | None = None,
    circuit: Collection[str] | None = None,
    edge_scores: Mapping[str, float] | None = None,
) -> Path:
    """Write MIB's circuit JSON to ``path`` (atomically).

    ``scores``: ``{edge: score}`` (``tn.edge_importance(noise)``; ``size``/``circuit`` then
    choose edges: the top ``size``, the edges of ``circuit`` such as
    ``tn.extract_circuit(...).edges``, or every scored edge), or ``{node: score}``
    (``tn.node_importance(noise)``); nodes without a score (not
    noised) are written with score 0 and ``in_graph: false``. The circuit is the top ``size``
    scored nodes, or the nodes in ``circuit``, or (neither given) every scored node. ``model``
    supplies MIB's ``cfg`` (n_layers, n_heads, d_model, parallel_attn_mlp; a dict works too).
    """
    payload = circuit_payload(scores, model, size, circuit, edge_scores)
    path = Path(path)
    write_json(path, payload)
    return path


def circuit_payload(
    scores: Mapping[str, float],
    model: Any,
    size: int | None = None,
    circuit: Collection[str] | None = None,
    edge_scores: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """The JSON object :func:`save_circuit` writes (same arguments, no file)."""
    if not isinstance(scores, Mapping):
        raise TLNoiseTypeError(
            f"scores must be a {{node: score}} mapping, got {type(scores).__name__}"
        )
    cfg = mib_cfg(model)
    nodes = graph_nodes(cfg)
    _check_finite(scores)
    if is_edge_scores(scores):
        return _edge_payload(scores, cfg, nodes, size, circuit)
    unknown = sorted(set(scores) - set(nodes))
    if unknown:
        raise TLNoiseValueError(f"scores name {unknown}, which are not nodes of this model "
                                f"(nodes: a{{l}}.h{{h}}, m{{l}}, input, logits)")  # fmt: skip
    kept = _circuit_of(scores, size, circuit, nodes) & (set(scores) | set(circuit or ()))
    in_graph = kept | set(ALWAYS_IN)
    edges = {}
    for name, parent in graph_edges(cfg):
        child = name.split("->")[1].split("<")[0]
        edges[name] = {
            "score": float((edge_scores or {}).get(name, 0.0)),
            "in_graph": parent in in_graph and child in in_graph,
        }
    return {
        "cfg": {k: v for k, v in cfg.items() if k != "attn_only"},
        "nodes": {
            n: {"score": float(scores.get(n, 0.0)), "in_graph": n in in_graph} for n in nodes
        },
        "edges": edges,
    }


def is_edge_scores(scores: Mapping[str, Any]) -> bool:
    """Whether ``scores`` names edges (``"writer->reader"``) rather than nodes."""
    return any("->" in name for name in scores)


def _check_finite(scores: Mapping[str, Any]) -> None:
    bad = {n: v for n, v in scores.items() if not isinstance(v, (int, float)) or isinstance(v, bool)
           or not math.isfinite(v)}  # fmt: skip
    if bad:
        raise TLNoiseValueError(f"scores must be finite numbers; got {dict(list(bad.items())[:5])}")


def _kept_edges(
    scores: Mapping[str, float],
    names: list[str],
    size: int | None,
    circuit: Collection[str] | None,
) -> set[str]:
    """The edges in the circuit: ``circuit``, the top ``size`` scored, or every scored edge."""
    index = {n: i for i, n in enumerate(names)}
    ranked = sorted(scores, key=lambda n: (-scores[n], index[n]))
    return _select(ranked, names, size, circuit, "edge", set(scores))


def _edge_payload(
    scores: Mapping[str, float],
    cfg: dict[str, Any],
    nodes: list[str],
    size: int | None,
    circuit: Collection[str] | None,
) -> dict[str, Any]:
    """MIB JSON of an edge circuit: the top ``size`` scored edges, the edges in ``circuit``, or
    every scored edge; a node is in the graph when an in-graph edge touches it, and its score is
    the best score of the edges it writes or reads."""
    names = [name for name, _ in graph_edges(cfg)]
    unknown = sorted(set(scores) - set(names))
    if unknown:
        raise TLNoiseValueError(f"scores name {unknown[:5]}, which are not edges of this model "
                                "(MIB names: 'a0.h1->a2.h0<q>', 'm0->logits', ...)")  # fmt: skip
    kept = _kept_edges(scores, names, size, circuit)
    node_score: dict[str, float] = {}
    in_graph = set(ALWAYS_IN)
    for name in names:
        writer, reader = name.split("->")
        reader = reader.split("<")[0]
        if name in scores:
            for node in (writer, reader):
                node_score[node] = max(node_score.get(node, -math.inf), float(scores[name]))
        if name in kept:
            in_graph.update((writer, reader))
    return {
        "cfg": {k: v for k, v in cfg.items() if k != "attn_only"},
        "nodes": {n: {"score": node_score.get(n, 0.0), "in_graph": n in in_graph} for n in nodes},
        "edges": {n: {"score": float(scores.get(n, 0.0)), "in_graph": n in kept} for n in names},
    }


def load_circuit(path: str | os.PathLike[str]) -> Circuit:
    """Read a MIB circuit JSON (ours or any tool's); ValueError naming what is malformed."""
    data = read_json(Path(path), "circuit file")
    if not isinstance(data, dict) or not all(
        isinstance(data.get(k), dict) for k in ("cfg", "nodes")
    ):
        raise TLNoiseValueError(f"{str(path)!r} is not a MIB circuit file (needs cfg and nodes)")
    nodes, edges = data["nodes"], data.get("edges") or {}
    for kind, table in (("node", nodes), ("edge", edges)):
        for name, entry in table.items():
            if not isinstance(entry, dict) or not isinstance(entry.get("in_graph", False), bool):
                raise TLNoiseValueError(f"{str(path)!r}: {kind} {name!r} is not "
                                        "{'score': number, 'in_graph': bool}")  # fmt: skip

    def score(entry: dict[str, Any]) -> float:
        value = entry.get("score")
        return float(value) if isinstance(value, (int, float)) else math.nan

    return Circuit(
        cfg=dict(data["cfg"]),
        node_scores={n: score(e) for n, e in nodes.items()},
        nodes_in_graph={n for n, e in nodes.items() if e.get("in_graph")},
        edge_scores={n: score(e) for n, e in edges.items()},
        edges_in_graph={n for n, e in edges.items() if e.get("in_graph")},
    )
