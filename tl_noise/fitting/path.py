"""Size-aware rankings from a path: one fit answers one trade-off; a ranking is judged at all sizes.

The path is a sweep of the task-loss budget of mode ``"budget"`` (``KL <= b``), from strict to
loose, each point warm-started from the previous one. Under a strict budget only the nodes the
behaviour does not need are destroyed; as the budget loosens, more nodes give way. A node's score
is how clean it stays along the whole path,

    score(node) = -mean_b log std_b(node),

so the nodes needed at every budget rank first and the nodes destroyed at the strictest budget
rank last (the way Edge Pruning sweeps its sparsity target).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from tl_noise.errors import TLNoiseValueError
from tl_noise.hooks import NoiseHooks, std_node_scores

DEFAULT_BUDGETS = (0.01, 0.03, 0.1, 0.3, 1.0)


def fit_path(
    fit: Callable[..., Any],
    model: Any,
    noise: NoiseHooks,
    tokens: Any,
    budgets: Sequence[float] = DEFAULT_BUDGETS,
    steps_per_budget: int = 60,
    **fit_kwargs: Any,
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Run ``fit(model, noise, tokens, mode="budget", budget=b, ...)`` for each budget in turn
    (``fit``: :func:`tl_noise.fit`); return the path scores and the node scores at each point."""
    if not budgets or any(not (isinstance(b, (int, float)) and b > 0) for b in budgets):
        raise TLNoiseValueError(f"budgets={list(budgets)!r}; expected positive numbers")
    points = []
    for budget in budgets:
        fit(model, noise, tokens, mode="budget", budget=float(budget), steps=steps_per_budget,
            refine_window=0, **fit_kwargs)  # fmt: skip
        points.append(std_node_scores(noise))
    nodes = list(points[0])
    scores = {n: sum(p[n] for p in points) / len(points) for n in nodes}
    return scores, points
