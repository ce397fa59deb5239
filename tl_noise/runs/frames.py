"""pandas views of a run (one row per step, per head, per ranked head) for notebooks and the
dashboard; mixed into :class:`tl_noise.runs.Run`."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tl_noise.names import hook_layer
from tl_noise.ranking import head_ranking
from tl_noise.runs.format import GRAD_KEYS, NAN, as_float

if TYPE_CHECKING:
    from torch import Tensor


class RunFrames:
    """The frame methods of :class:`~tl_noise.runs.Run` (which supplies ``n_layers``,
    ``n_heads``, ``history()``, ``summary()``, ``_cached``, ``_head_view``, ``_stds_of``,
    ``head_std_matrix`` and ``ground_truth``)."""

    n_layers: int
    n_heads: int

    if TYPE_CHECKING:  # supplied by Run; declared here for the type checker only

        def history(self) -> list[dict[str, Any]]: ...
        def summary(self) -> dict[str, Any] | None: ...
        def _cached(self, key: Any, compute: Callable[[], Any]) -> Any: ...
        def _head_view(self, stds: dict[str, Tensor]) -> dict[str, Tensor]: ...
        def _stds_of(self, record: dict[str, Any], step: int) -> dict[str, Tensor]: ...
        def is_full(self, record: dict[str, Any]) -> bool: ...
        def head_std_matrix(self, step: int | None = None) -> Tensor: ...
        def ground_truth(self) -> dict[str, list[list[int]]] | None: ...

    def loss_frame(self) -> Any:
        """pandas DataFrame, one row per logged step: step, task, noise, total, mean_std,
        lambda, alpha, scale (the last two: global alphaless equivalents)."""
        import pandas as pd

        def build() -> Any:
            rows = []
            for r in self.history():
                loss, eq = r.get("loss") or {}, r.get("equivalent") or {}
                rows.append({
                    "step": r["step"],
                    **{k: as_float(loss.get(k)) for k in ("task", "noise", "total", "lambda")},
                    "mean_std": as_float(r.get("mean_std")),
                    "alpha": as_float(eq.get("alpha")),
                    "scale": as_float(eq.get("scale")),
                })  # fmt: skip
            columns = ["step", "task", "noise", "total", "mean_std", "lambda", "alpha", "scale"]
            return pd.DataFrame(rows, columns=columns)

        return self._cached("loss_frame", build).copy()

    def history_frame(self) -> Any:
        """pandas DataFrame, one row per full-record step x per-head hook x head: step, hook,
        layer, head, std (geometric mean over a head's features/positions) and, when recorded,
        the gradient statistics of :data:`GRAD_KEYS` (summary records carry neither)."""
        import pandas as pd

        def build() -> Any:
            columns: dict[str, list[Any]] = {k: [] for k in ("step", "hook", "layer", "head")}
            columns.update({k: [] for k in ("std", *GRAD_KEYS)})
            seen: set[str] = set()
            for r in filter(self.is_full, self.history()):
                view = self._head_view(self._stds_of(r, r["step"]))
                grads = r.get("grad") or {}
                for name, std in view.items():
                    per_head = std.double().reshape(self.n_heads, -1).log().mean(1).exp()
                    stats = grads.get(name) or {}
                    seen.update(k for k in stats if k in GRAD_KEYS)
                    for head in range(self.n_heads):
                        columns["step"].append(r["step"])
                        columns["hook"].append(name)
                        columns["layer"].append(hook_layer(name))
                        columns["head"].append(head)
                        columns["std"].append(float(per_head[head]))
                        for k in GRAD_KEYS:
                            values = stats.get(k)
                            if isinstance(values, list) and len(values) == self.n_heads:
                                columns[k].append(as_float(values[head]))
                            else:
                                columns[k].append(NAN)
            keep = ["step", "hook", "layer", "head", "std", *(k for k in GRAD_KEYS if k in seen)]
            return pd.DataFrame({k: columns[k] for k in keep})

        return self._cached("history_frame", build).copy()

    def ranking_frame(self, step: int | None = None) -> Any:
        """pandas DataFrame of heads, most important first: rank, layer, head, std, importance
        and, when the run knows its circuit, the ground-truth class ("" if none).

        ``importance``: for the final step, the fit's own answer when it recorded one
        (``summary.json``'s ``node_importance``, e.g. the refined ranking; the same order as
        ``tl-noise show``), else ``-log std``.
        """
        import pandas as pd

        std = self.head_std_matrix(step)
        importance = self.fitted_head_importance() if step is None else None
        importance = -std.log() if importance is None else importance
        truth = self.ground_truth() or {}
        label = {(int(l_), int(h)): cls for cls, heads in truth.items() for l_, h in heads}
        rows: list[dict[str, Any]] = []
        for i in head_ranking(importance).tolist():
            layer, head = divmod(int(i), self.n_heads)
            if bool(std[layer, head].isnan()):
                continue
            row: dict[str, Any] = {
                "rank": len(rows) + 1,
                "layer": layer,
                "head": head,
                "std": float(std[layer, head]),
                "importance": float(importance[layer, head]),
            }
            if truth:
                row["ground_truth"] = label.get((layer, head), "")
            rows.append(row)
        columns = ["rank", "layer", "head", "std", "importance"] + (["ground_truth"] * bool(truth))
        return pd.DataFrame(rows, columns=columns)

    def fitted_head_importance(self) -> Any:
        """``[n_layers, n_heads]`` of the fit's recorded node importance (NaN for heads it does
        not score), or None when the summary has none."""
        import torch

        try:
            scores = (self.summary() or {}).get("node_importance")
        except ValueError:
            return None
        if not isinstance(scores, dict):
            return None
        out = torch.full((self.n_layers, self.n_heads), NAN)
        for layer in range(self.n_layers):
            for head in range(self.n_heads):
                value = scores.get(f"a{layer}.h{head}")
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    out[layer, head] = float(value)
        return None if bool(out.isnan().all()) else out
