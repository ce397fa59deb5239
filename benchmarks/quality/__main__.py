"""Node-level attribution quality on the shipped benchmark models, every method in one run.

Usage::

    .venv/bin/python -m benchmarks.quality [--models backup distractor mlp induction]
        [--methods NAME ...] [--n 128] [--no-slow] [--json PATH]

For each model: one evaluation set (``Benchmark.task(n, seed=EVAL_SEED)``) that every method
fits or scores on, and that every circuit is judged on (nodes outside it mean-ablated over the
set; metric = mean log-prob of the true next token at the target positions; MIB's normalised
``f``). The exact ``f`` of all ``2^N`` node subsets gives the optimum ``f*(k)``, the best single
ranking (the ceiling), ``k90*`` and the minimal circuit (:mod:`tl_noise.evaluation.exact`); it is
computed once per model and cached under ``benchmarks/results/``. Per method it prints the area
of its top-k curve relative to the optimum, MIB's CMD and CPR, k90 vs k90*, ROC AUC against the
minimal circuit, seconds and forward passes; the curves go to the JSON for the README figure.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.quality.methods import methods, node_count
from tl_noise.evaluation import exact
from tl_noise.evaluation.metrics import roc_auc
from tl_noise.evaluation.nodes import circuit_nodes, node_ranking
from tl_noise.zoo import EVAL_N, EVAL_SEED, exact_table_path, list_benchmarks, load_benchmark

RESULTS = Path(__file__).resolve().parents[1] / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__)
    p.add_argument(
        "--models",
        nargs="+",
        default=[m for m in list_benchmarks()],
        help="zoo models, or tracr-NAME for a compiled program (tl_noise.zoo.compiled)",
    )
    p.add_argument("--methods", nargs="+", help="method names (default: all)")
    p.add_argument(
        "--data-dir",
        type=Path,
        help="models written by scripts/train_benchmarks.py "
        "--out DIR (held out: exact tables computed and cached, never the shipped)",
    )
    p.add_argument("--n", type=int, default=EVAL_N, help="evaluation sequences")
    p.add_argument("--no-slow", action="store_true", help="skip ACDC-style greedy elimination")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steady timings)")
    p.add_argument("--json", type=Path, default=RESULTS / "attribution_quality.json")
    return p.parse_args(argv)


def exact_table(
    name: str,
    model: Any,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    cache: Path = RESULTS,
    folder: Path | None = None,
) -> Any:
    """The exact table of ``name`` on this evaluation set: the shipped one for the standard set
    (:func:`tl_noise.zoo.exact_table_path`), else computed once and cached in the results."""
    shipped = exact_table_path(name)
    # compiled programs' and held-out models' tables are cached, never shipped
    trained = name in list_benchmarks() and folder is None
    standard = trained and len(tokens) == EVAL_N
    tag = name if folder is None else f"{folder.name}-{name}"
    where = shipped if standard else cache / f"exact-{tag}-n{len(tokens)}"
    if (where / "exact_table.json").is_file():
        return exact.ExactTable.load(where)
    began = time.perf_counter()
    table = exact.compute_and_save(model, tokens, mask, where, progress=False)
    print(f"  exact table of {name}: 2^{len(table.nodes)} subsets in "
          f"{time.perf_counter() - began:.0f} s")  # fmt: skip
    return table


def judge(table: Any, scores: dict[str, float]) -> dict[str, Any]:
    ranking = node_ranking(scores, table.nodes)
    return exact.judge_ranking(table, ranking, scores)


def run_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    bench = load_benchmark(name, folder=args.data_dir)
    model = bench.model
    task = bench.task(n=args.n, seed=EVAL_SEED)
    tokens, mask = task.tokens, task.loss_mask
    corrupted = bench.corrupted_tokens(task)
    nodes = circuit_nodes(model)
    print(f"\n== {name}: {len(nodes)} nodes ({node_count(model)}), {len(tokens)} sequences")
    table = exact_table(name, model, tokens, mask, args.json.parent, args.data_dir)
    live = getattr(bench, "live_nodes", None)
    rows = {}
    for method, run in methods(include_slow=not args.no_slow).items():
        if args.methods and method not in args.methods:
            continue
        result = run(model, tokens, mask, corrupted)
        row = judge(table, result.scores)
        row.update(seconds=result.seconds, forwards=result.forwards, scores=result.scores)
        if live is not None and 0 < len(live) < len(nodes):  # a compiled program's live nodes
            row["roc_auc_live"] = roc_auc(torch.tensor([result.scores[v] for v in nodes]),
                                          torch.tensor([v in live for v in nodes]))  # fmt: skip
        rows[method] = row
        print_row(method, row)
    ceiling = exact.judge_ranking(table, exact.ranking_ceiling(table)[0], None)
    print(f"{'(ranking ceiling)':34} {ceiling['area_ratio']:6.3f} {ceiling['cmd']:6.3f} "
          f"{ceiling['cpr']:6.3f} {ceiling['k90']!s:>4}  k90*={ceiling['k90_star']}")  # fmt: skip
    return {"nodes": nodes, "methods": rows, "ceiling": ceiling, "live_nodes": live,
            "optimum": exact.optimum_curve(table)[0].tolist(),
            "k90_star": exact.k90_star(table)}  # fmt: skip


HEADER = (f"{'method':34} {'area':>6} {'CMD':>6} {'CPR':>6} {'k90':>4} {'AUC':>6} {'s':>7} "
          f"{'fwd':>8} {'AUC-live':>8}")  # fmt: skip


def print_row(method: str, row: dict[str, Any]) -> None:
    if method == "tl-noise":
        print(HEADER)
    k90 = "-" if row.get("k90") is None else str(row["k90"])
    auc = float("nan") if row.get("roc_auc") is None else row["roc_auc"]
    live = "" if row.get("roc_auc_live") is None else f" {row['roc_auc_live']:8.3f}"
    print(f"{method:34} {row['area_ratio']:6.3f} {row['cmd']:6.3f} {row['cpr']:6.3f} {k90:>4} "
          f"{auc:6.3f} {row['seconds']:7.1f} {row['forwards']:8.1f}{live}", flush=True)  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {name: run_model(name, args) for name in args.models}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1, default=float))
    print(f"\nresults: {args.json}")
    return results


if __name__ == "__main__":
    main()
