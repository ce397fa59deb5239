"""``tl-noise demo``: tl-noise beside the baselines on a benchmark model where methods differ,
judged against the exact optimum, then the dashboard on the run it wrote.

The default model is the zoo's ``backup`` model (3 layers x 4 heads + MLPs, trained with head
dropout, so redundant heads hide from one-at-a-time methods). Every method scores the 15 nodes
on the same evaluation set; a ranking is judged by ``f(top_k)`` for every size ``k`` (nodes
outside the top ``k`` mean-ablated), against the best set of each size, which the package ships
precomputed over all ``2^15`` subsets.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import torch

DEFAULT_MODEL = "backup"
DEMO_BASELINES = ("mean ablation", "activation patching", "attribution patching (TL)")


def _table(name: str) -> Any:
    from tl_noise.evaluation.exact import ExactTable
    from tl_noise.zoo import exact_table_path

    path = exact_table_path(name)
    if path.is_dir():
        return ExactTable.load(path)
    return None


def _judge(table: Any, scores: dict[str, float]) -> dict[str, Any]:
    from tl_noise.evaluation.exact import judge_ranking
    from tl_noise.evaluation.nodes import node_ranking

    return judge_ranking(table, node_ranking(scores, table.nodes), scores)


def _row(name: str, judged: dict[str, Any] | None, seconds: float, forwards: float) -> str:
    if judged is None:
        return f"{name:28} {seconds:7.1f} {forwards:8.0f}"
    k90 = "-" if judged["k90"] is None else judged["k90"]
    auc = "-" if judged["roc_auc"] is None else format(judged["roc_auc"], ".3f")
    return (f"{name:28} {judged['area_ratio']:6.3f} {judged['cmd']:6.3f} {k90!s:>4} "
            f"{auc:>6} {seconds:7.1f} {forwards:8.0f}")  # fmt: skip


def _ground_truth(labels: dict[str, Any]) -> dict[str, list[list[int]]]:
    """The labelled heads as ``{role: [[layer, head], ...]}`` for the dashboard's overlay."""
    from tl_noise.names import parse_node

    out: dict[str, list[list[int]]] = {}
    for role, nodes in (labels.get("structure") or {}).items():
        heads = [parse_node(n) for n in nodes if isinstance(n, str)]
        pairs = [[layer, head] for layer, head in (p for p in heads if p) if head is not None]
        if pairs:
            out[role] = pairs
    return out


def cmd_demo(args: argparse.Namespace) -> int:
    from tl_noise.evaluation.node_baselines import BASELINES
    from tl_noise.zoo import EVAL_N, EVAL_SEED, load_benchmark

    torch.set_num_threads(args.threads)
    bench = load_benchmark(args.model)
    model, task = bench.model, bench.task(n=EVAL_N, seed=EVAL_SEED)
    model.ground_truth = _ground_truth(bench.labels)
    table = _table(args.model)
    print(f"benchmark model {args.model!r}: {model.cfg.n_layers} layers x {model.cfg.n_heads} "
          f"heads{' + MLPs' if not model.cfg.attn_only else ''}, {len(task)} sequences; "
          f"{bench.info.get('description', '')}".rstrip("; "))  # fmt: skip
    began = time.perf_counter()
    from tl_noise.cli.main import _fit_from_args

    result = _fit_from_args(model, task, args, f"demo-{args.model}", add_curve=False)
    seconds = time.perf_counter() - began
    scores = result.node_scores or {}
    header = f"{'method':28} {'area':>6} {'CMD':>6} {'k90':>4} {'AUC':>6} {'s':>7} {'forwards':>8}"
    print(f"\n{header}")
    judged = _judge(table, scores) if table else None
    print(_row("tl-noise", judged, seconds, result.forwards))
    for name in DEMO_BASELINES if not args.no_baselines else ():
        out = BASELINES.get(name)(model, task.tokens, task.loss_mask,
                                  corrupted_tokens=bench.corrupted_tokens(task))  # fmt: skip
        print(_row(name, _judge(table, out.scores) if table else None, out.seconds, out.forwards))
    if table is not None:
        from tl_noise.evaluation.exact import judge_ranking, ranking_ceiling

        best = judge_ranking(table, ranking_ceiling(table)[0])
        print(f"{'best ranking (exact)':28} {best['area_ratio']:6.3f} {best['cmd']:6.3f} "
              f"{best['k90']!s:>4}   (k90* = {best['k90_star']}; area 1 = the best set of "
              "every size)")  # fmt: skip
    ranked = sorted(scores, key=lambda n: -scores[n])
    roles = {n: r for r, ns in (bench.labels.get("structure") or {}).items() for n in ns}
    print("\ntl-noise's ranking: " + ", ".join(f"{n}{'(' + roles[n] + ')' if n in roles else ''}"
                                             for n in ranked[: args.top]))  # fmt: skip
    print(f"\nrun directory: {result.run_dir}")
    return _maybe_app(args, Path(result.run_dir))


def _maybe_app(args: argparse.Namespace, run_dir: Path) -> int:
    no_app = os.environ.get("TL_NOISE_NO_APP", "").strip().lower() not in ("", "0", "false", "no")
    if args.no_app or no_app:
        print(f"open it with: .venv/bin/tl-noise app {run_dir}   (or: make app RUN={run_dir})")
        return 0
    from tl_noise.cli.app import launch

    print(f"dashboard: http://127.0.0.1:{args.port}  (Ctrl-C to stop)")
    launch(run_dir, port=args.port, block=True)
    return 0


def add_demo_parser(sub: Any, common: Any, formatter: Any) -> None:
    """Register ``tl-noise demo``."""
    from tl_noise.zoo import list_benchmarks

    demo = sub.add_parser("demo", formatter_class=formatter,
                          help="tl-noise beside the baselines on a benchmark model")  # fmt: skip
    demo.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        choices=list_benchmarks(),
        help="benchmark model (the zoo's; 'induction' is the easy embedded one)",
    )
    from tl_noise.names import NODE_HOOKS

    common(demo, steps=500, hooks=NODE_HOOKS)
    demo.add_argument("--top", type=int, default=8, help="nodes to list")
    demo.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (small models: 1 is fastest on a busy machine)",
    )
    demo.add_argument("--no-baselines", action="store_true", help="fit tl-noise only")
    demo.add_argument(
        "--no-app", action="store_true", help="do not start the dashboard (also: TL_NOISE_NO_APP=1)"
    )
    demo.add_argument("--port", type=int, default=8501)
    demo.set_defaults(func=cmd_demo)
