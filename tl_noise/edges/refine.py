"""The fitted edge ranking refined in context at the circuit sizes a fit measures.

Edge noise is fitted on the full model, but a circuit of ``k`` edges is judged with every other
edge ablated, where edges that matter only jointly, or only once others are gone, show up. A fit
measures ``f(top_k)`` at a few sizes ``k_1 < k_2 < ...`` (MIB's edge fractions:
:func:`tl_noise.fitting.edge_curve.curve_sizes`); at each size :func:`polish_at_sizes` tries to
exchange one of the last ``depth`` edges of the top ``k_i`` with one of the ``window`` edges just
after it (positions ``k_i .. k_{i+1} - 1``), and keeps the exchange that brings ``f(top_k_i)``
closest to 1 when it is closer than before (the quantity MIB's CMD integrates). Such an exchange
changes the top-``k_i`` set and no other measured set, so the measured curve only improves;
every trial is one forward pass, at most ``sizes x depth x window`` in all, whatever the size of
the graph.

On graphs small enough (at most :data:`ELIMINATE_FORWARDS` trials, i.e. about
``ELIMINATE_FORWARDS / window`` edges) the exchanges are preceded by windowed backward
elimination, as for nodes (:func:`eliminate`): from the whole graph, of the ``window``
lowest-ranked edges still kept, the one whose removal leaves ``f`` closest to 1 is removed, until
one edge is left; the removal order reversed is the ranking. It costs about ``window`` forwards
per edge and repairs rankings the exchanges cannot (a needed edge ranked near the bottom).

The ranking is kept as the list of exchanges (``noise.ranking_info["swaps"]``, each
``[promoted, demoted]``) applied to the ``-log std`` ranking; :func:`refined_scores` turns them
into scores whose order is the refined ranking (the ``-log std`` values, sorted and reassigned
in that order, made strictly decreasing by a few ulps where they tie).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

from tl_noise.edges.circuit import rank_edges
from tl_noise.errors import TLNoiseValueError

WINDOW = 8  # candidates after a size tried per exchange
DEPTH = 3  # last members of a size tried
ELIMINATE_WINDOW = 8  # lowest-ranked kept edges tried per removal
ELIMINATE_FORWARDS = 4096  # the most trials the elimination may take (graphs above: skipped)


def elimination_cost(n_edges: int, window: int = ELIMINATE_WINDOW) -> int:
    """Forward passes :func:`eliminate` takes on ``n_edges`` edges."""
    return sum(min(window, kept) for kept in range(2, n_edges + 1))


def eliminate(
    faithfulness: Callable[[list[str]], float], ranked: Sequence[str],
    window: int = ELIMINATE_WINDOW,
) -> list[str]:  # fmt: skip
    """Windowed backward elimination (module doc): the refined ranking, most important first;
    ``faithfulness(edges)`` is ``f`` of a circuit (one forward pass); ties go to the
    lowest-ranked candidate."""
    kept, removed = list(ranked), []
    while len(kept) > 1:
        trials = []
        for i, edge in enumerate(kept[-window:]):
            value = faithfulness([e for e in kept if e != edge])
            trials.append((abs(1 - value), -i, edge))
        edge = min(trials)[2]
        kept.remove(edge)
        removed.append(edge)
    return kept + removed[::-1]


def swaps_between(ranked: Sequence[str], order: Sequence[str]) -> list[list[str]]:
    """Exchanges ``[promoted, demoted]`` that turn ``ranked`` into ``order`` (a permutation of
    it) under :func:`apply_swaps`: at most ``len(order) - 1``."""
    current = list(ranked)
    where = {e: i for i, e in enumerate(current)}
    swaps: list[list[str]] = []
    for i, edge in enumerate(order):
        if current[i] != edge:
            j, demoted = where[edge], current[i]
            swaps.append([edge, demoted])
            current[i], current[j] = edge, demoted
            where[edge], where[demoted] = i, j
    return swaps


def polish_at_sizes(
    faithfulness: Callable[[list[str]], float], ranked: Sequence[str], sizes: Sequence[int],
    window: int = WINDOW, depth: int = DEPTH,
) -> tuple[list[str], list[list[str]], dict[int, float]]:  # fmt: skip
    """``(ranking, exchanges [promoted, demoted], f at each size)`` (module doc);
    ``faithfulness(edges)`` is ``f`` of a circuit (one forward pass)."""
    order = list(ranked)
    swaps: list[list[str]] = []
    values: dict[int, float] = {}
    levels = sorted({k for k in sizes if 0 < k < len(order)})
    for i, k in enumerate(levels):
        low = levels[i - 1] if i else 0
        high = levels[i + 1] if i + 1 < len(levels) else len(order)
        current = faithfulness(order[:k])
        for p in range(k - 1, max(low, k - depth) - 1, -1):
            best: tuple[float, int] | None = None
            for q in range(k, min(high, k + window)):
                trial = order[:k]
                trial[p] = order[q]
                value = faithfulness(trial)
                if abs(1 - value) < abs(1 - (current if best is None else best[0])) - 1e-9:
                    best = (value, q)
            if best is not None:
                current, q = best
                swaps.append([order[q], order[p]])
                order[p], order[q] = order[q], order[p]
        values[k] = current
    return order, swaps, values


def apply_swaps(ranked: Sequence[str], swaps: Sequence[Sequence[str]]) -> list[str]:
    """``ranked`` with each ``[promoted, demoted]`` pair exchanged, in order."""
    order = list(ranked)
    where = {e: i for i, e in enumerate(order)}
    for pair in swaps:
        if len(pair) != 2 or any(e not in where for e in pair):
            raise TLNoiseValueError(f"an exchange must name two edges of the ranking; got {pair!r}")
        promoted, demoted = pair
        i, j = where[promoted], where[demoted]
        order[i], order[j] = demoted, promoted
        where[promoted], where[demoted] = j, i
    return order


def refined_scores(
    scores: Mapping[str, float], swaps: Sequence[Sequence[str]] | None,
    edges: Sequence[str] | None = None,
) -> dict[str, float]:  # fmt: skip
    """``scores`` reordered to follow the refined ranking (module doc), in ``scores``' key
    order; ``scores`` as they are without swaps. ``edges``: the order that breaks ties of the
    ``-log std`` ranking (the graph's, :meth:`EdgeGraph.locate`, as the fit used; default the
    keys' order)."""
    if not swaps:
        return dict(scores)
    order = apply_swaps(rank_edges(scores, list(scores) if edges is None else edges), swaps)
    edges = list(scores)
    values = sorted((float(scores[e]) for e in edges), reverse=True)
    out: dict[str, float] = {}
    previous = math.inf
    for edge, value in zip(order, values, strict=True):
        value = min(value, math.nextafter(previous, -math.inf))
        out[edge] = previous = value
    return {e: out[e] for e in edges}
