"""Time to answer: a fit can stop once its node ranking has stopped changing.

After every step the noised nodes are ranked by ``-log std`` rounded to ``decimals`` (so that
nodes pinned at the same bound tie, and ties keep node order); the fit is *stable* once that
ranking has been identical for ``window`` consecutive steps. The tracker's state is part of each
checkpoint, so a resumed run stops at the same step as an uninterrupted one.
"""

from __future__ import annotations

from typing import Any

from tl_noise.hooks import NoiseHooks


def rounded_ranking(noise: NoiseHooks, decimals: int = 1) -> list[str]:
    """Nodes (edges, for edge noise) by ``-log std`` rounded to ``decimals`` (nats), most
    important first."""
    scores = noise.ranking_scores()
    index = {n: i for i, n in enumerate(scores)}
    return sorted(scores, key=lambda n: (-round(scores[n], decimals), index[n]))


class RankingStability:
    """Counts the consecutive steps with an unchanged (rounded) node ranking."""

    def __init__(self, window: int, decimals: int = 1) -> None:
        self.window, self.decimals = window, decimals
        self.last: list[str] | None = None
        self.unchanged = 0

    def update(self, noise: NoiseHooks) -> bool:
        """Record this step's ranking; True once it has held for ``window`` steps."""
        ranking = rounded_ranking(noise, self.decimals)
        self.unchanged = self.unchanged + 1 if ranking == self.last else 0
        self.last = ranking
        return self.window > 0 and self.unchanged >= self.window

    def state(self) -> dict[str, Any]:
        return {"ranking": self.last, "unchanged": self.unchanged}

    def load_state(self, state: dict[str, Any] | None) -> None:
        state = state or {}
        self.last, self.unchanged = state.get("ranking"), int(state.get("unchanged", 0))
