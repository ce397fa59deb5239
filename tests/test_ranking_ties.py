"""Tied heads are listed in node order (layer, then head) by every view of a ranking.

The views: :func:`tl_noise.ranking.head_ranking` and :func:`~tl_noise.ranking.rank_heads` on an
importance matrix, and of a run directory: ``summary.json``'s ``"ranking"``, the reader's
``Run.ranking_frame()`` (the dashboard's table) and what ``tl-noise show`` prints.
"""

from __future__ import annotations

import inspect
import json
import math
import re

import pytest
import torch
from conftest import HOOKS
from hypothesis import given, settings
from hypothesis import strategies as st

import tl_noise as tn
from tl_noise.fitting import fit
from tl_noise.ranking import head_ranking, rank_heads

pytestmark = pytest.mark.tl3
NAN = float("nan")


def node_order(importance: torch.Tensor) -> list[tuple[int, int]]:
    """The expected order, computed independently: importance descending, then layer, then
    head; NaN (no noise there) left out."""
    n_layers, n_heads = importance.shape
    heads = [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
    scored = [(lh, float(importance[lh])) for lh in heads if not math.isnan(importance[lh])]
    return [lh for lh, score in sorted(scored, key=lambda x: (-x[1], x[0]))]


def from_flat(indices, n_heads: int) -> list[tuple[int, int]]:
    return [divmod(int(i), n_heads) for i in indices]


def from_rows(rows) -> list[tuple[int, int]]:
    return [(int(r["layer"]), int(r["head"])) for r in rows]


def test_ties_and_nan_in_an_importance_matrix():
    importance = torch.tensor([[1.0, 2.0, 2.0, NAN], [2.0, 1.0, NAN, 2.0], [0.5, 2.0, 1.0, 0.5]])
    expected = [(0, 1), (0, 2), (1, 0), (1, 3), (2, 1), (0, 0), (1, 1), (2, 2), (2, 0), (2, 3)]
    assert node_order(importance) == expected
    assert from_rows(rank_heads(importance)) == expected
    ranked = head_ranking(importance)
    assert from_flat(ranked[: len(expected)], 4) == expected
    assert from_flat(ranked[len(expected) :], 4) == [(0, 3), (1, 2)]  # NaN last, in node order


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 4).flatmap(
        lambda n_heads: st.lists(
            st.lists(st.sampled_from([0.0, 1.0, 2.5, NAN]), min_size=n_heads, max_size=n_heads),
            min_size=1,
            max_size=4,
        )
    )
)
def test_tied_heads_keep_node_order(rows):
    importance = torch.tensor(rows)
    expected = node_order(importance)
    assert from_rows(rank_heads(importance)) == expected
    assert from_flat(head_ranking(importance)[: len(expected)], importance.shape[1]) == expected


@pytest.fixture(scope="module")
def tied_run(tiny_model, data, tmp_path_factory):
    """A run whose final per-head stds have ties across and within layers.

    The rhos are set to three values before a fit whose learning rate is far below the rhos'
    float32 resolution, so the fit writes every file of a run but the stds stay exactly tied.
    The in-context refinement of the ranking at the end of a fit (``refine_window``, where
    ``fit`` has it) is switched off: it replaces ``-log std`` by refined scores, without ties.
    """
    model, (tokens, mask) = tiny_model, data
    run_dir = tmp_path_factory.mktemp("ties") / "run"
    pattern = {0: [0.5, 0.25, 0.5, 0.75], 1: [0.25, 0.5, 0.75, 0.5]}  # 3 groups, interleaved
    no_refine = {"refine_window": 0} if "refine_window" in inspect.signature(fit).parameters else {}
    with tn.attach_noise(model, HOOKS, granularity="head", calibration_tokens=tokens) as noise:
        with torch.no_grad():
            for layer, rhos in pattern.items():
                noise.layer(f"blocks.{layer}.attn.hook_z").rhos.copy_(torch.tensor(rhos))
        result = fit(model, noise, tokens, loss_mask=mask, steps=2, lr=1e-30, batch_size=8,
                     run_dir=run_dir, quiet=True, **no_refine)  # fmt: skip
    return run_dir, result


def test_every_view_of_a_run_lists_tied_heads_alike(tied_run, capsys):
    pytest.importorskip("pandas")  # Run.ranking_frame
    from tl_noise.cli.main import main
    from tl_noise.runs import Run

    run_dir, result = tied_run
    importance = result.importance
    assert importance.shape == (2, 4)
    assert len({float(x) for x in importance.flatten()}) == 3, "the stds are not tied any more"
    expected = node_order(importance)

    views = {
        "head_ranking": from_flat(head_ranking(importance), 4),
        "rank_heads": from_rows(rank_heads(importance)),
        "summary.json": from_rows(json.loads((run_dir / "summary.json").read_text())["ranking"]),
        "Run.ranking_frame": from_rows(Run(run_dir).ranking_frame().to_dict("records")),
    }
    capsys.readouterr()
    assert main(["show", str(run_dir), "--top", "100"]) == 0
    shown = re.findall(r"^\s*\d+\s+L(\d+)H(\d+)\s", capsys.readouterr().out, flags=re.M)
    views["tl-noise show"] = [(int(layer), int(head)) for layer, head in shown]
    assert {name: order for name, order in views.items() if order != expected} == {}


def test_the_dashboard_table_and_show_list_the_refined_ranking(tiny_model, data, tmp_path, capsys):
    pytest.importorskip("pandas")
    from tl_noise.cli.main import main
    from tl_noise.runs import Run

    tokens, mask = data
    with tn.attach_noise(tiny_model, HOOKS, calibration_tokens=tokens) as noise:
        fit(tiny_model, noise, tokens, loss_mask=mask, steps=3, batch_size=8,
            run_dir=tmp_path / "run", quiet=True)  # fmt: skip
        scores = tn.node_importance(noise)
    assert noise.node_scores is not None  # the default fit refined its ranking
    expected = [(int(n[1]), int(n[4])) for n in sorted(scores, key=lambda n: -scores[n])]
    frame = Run(tmp_path / "run").ranking_frame().to_dict("records")
    assert from_rows(frame) == expected
    assert [r["importance"] for r in frame] == sorted(scores.values(), reverse=True)
    capsys.readouterr()
    assert main(["show", str(tmp_path / "run"), "--top", "100"]) == 0
    shown = re.findall(r"^\s*\d+\s+L(\d+)H(\d+)\s", capsys.readouterr().out, flags=re.M)
    assert [(int(a), int(b)) for a, b in shown] == expected
