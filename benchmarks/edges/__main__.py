"""Edge-level attribution quality on the shipped benchmark models, every method in one run.

Usage::

    .venv/bin/python -m benchmarks.edges [--models backup distractor mlp induction gpt2-hf]
        [--methods NAME ...] [--n 128] [--ablations mean resample] [--no-extract] [--json PATH]

Per model one evaluation set (``Benchmark.task(n, seed=EVAL_SEED)`` and its corrupted tokens)
that every method scores on and every ranking is judged on (:mod:`benchmarks.edges.judge`):
``f`` of the top-k edges at MIB's edge fractions under mean and resample ablation, MIB's CPR and
CMD, the circuit ``tn.extract_circuit`` needs for ``f >= 0.9`` (and its prefix before pruning),
ROC AUC against node-derived edge labels (zoo models), seconds and forward passes. ``gpt2-hf``
is a tiny GPT-2 quickly trained on the induction task and booted from a Hugging Face
checkpoint (:mod:`benchmarks.edges.hf_gpt2`): the one model here on which TransformerLens' own
edge attribution patching runs. Results: ``benchmarks/results/edge_quality.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

from benchmarks.edges.crosscheck import cross_check
from benchmarks.edges.judge import curve, edge_auc, edge_labels, extract
from benchmarks.edges.methods import METHODS, EdgeScores
from tl_noise.edges import EdgeCircuitEvaluator, EdgeGraph
from tl_noise.fitting.edge_curve import EDGE_FRACTIONS
from tl_noise.zoo import EVAL_N, EVAL_SEED, list_benchmarks, load_benchmark

RESULTS = Path(__file__).resolve().parents[1] / "results"
HF = "gpt2-hf"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.edges", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--models", nargs="+", default=[*list_benchmarks(), HF])
    p.add_argument("--methods", nargs="+", help="method names (default: all)")
    p.add_argument("--n", type=int, default=EVAL_N, help="evaluation sequences")
    p.add_argument("--ablations", nargs="+", default=["mean", "resample"])
    p.add_argument("--no-extract", action="store_true", help="skip tn.extract_circuit")
    p.add_argument("--hf-steps", type=int, default=800, help="training steps of gpt2-hf")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steady timings)")
    p.add_argument("--json", type=Path, default=RESULTS / "edge_quality.json")
    return p.parse_args(argv)


def load(name: str, args: argparse.Namespace) -> tuple[Any, Any, dict[str, Any]]:
    if name == HF:
        from benchmarks.edges.hf_gpt2 import trained_gpt2

        return trained_gpt2(args.hf_steps)
    bench = load_benchmark(name)
    return bench.model, bench, {"booted": "natively (tl_noise.zoo)"}


def score(name: str, model: Any, data: tuple[Any, ...], methods: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for method in methods:
        try:
            result: EdgeScores = METHODS[method](model, *data)
        except (NotImplementedError, ImportError, ValueError) as err:
            out[method] = {"error": f"{type(err).__name__}: {err}"}
            print(f"{method:26} not run: {out[method]['error'][:150]}", flush=True)
            continue
        out[method] = {"seconds": result.seconds, "forwards": result.forwards,
                       "details": result.details, "scores": result.scores}  # fmt: skip
    return out


def run_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    model, bench, info = load(name, args)
    task = bench.task(n=args.n, seed=EVAL_SEED)
    tokens, mask, corrupted = task.tokens, task.loss_mask, bench.corrupted_tokens(task)
    graph = EdgeGraph.of(model)
    print(f"\n== {name}: {graph.n_edges} edges, {len(tokens)} sequences", flush=True)
    methods = [m for m in METHODS if not args.methods or m in args.methods]
    rows = score(name, model, (tokens, mask, corrupted), methods)
    for ablation in args.ablations:
        bad = corrupted if ablation == "resample" else None
        with EdgeCircuitEvaluator(model, tokens, mask, ablation, corrupted_tokens=bad) as ev:
            edges = ev.edges
            for row in rows.values():
                if "scores" in row:
                    row.setdefault("curves", {})[ablation] = curve(ev, row["scores"])
    if hasattr(bench, "live_nodes"):  # a compiled program: its exact edges
        labels = {"positive": bench.edges, "constant": bench.labels.get("constant_edges", [])}
    else:
        labels = edge_labels(name, len(tokens), edges) if name != HF else None
    for row in rows.values():
        if "scores" not in row:
            continue
        if not args.no_extract:
            row["extract"] = extract(model, tokens, mask, row["scores"])
        if labels is not None:
            row["roc_auc"] = edge_auc(row["scores"], edges, labels["positive"])
        if labels is not None and labels.get("constant"):  # without BOS / `one`-only reads
            rest = [e for e in edges if e not in set(labels["constant"])]
            row["roc_auc_nonconstant"] = edge_auc(row["scores"], rest, labels["positive"])
    for method, row in rows.items():
        print_row(method, row, args.ablations)
    out = {"n_edges": len(edges), "n_examples": len(tokens), "model": info, "labels": labels,
           "methods": rows}  # fmt: skip
    tl, ours = rows.get("TL EAP (resample)", {}), rows.get("tl-noise EAP (resample)", {})
    if "scores" in tl and "scores" in ours:
        out["cross_check"] = check = cross_check(model, tokens, corrupted, mask, tl["scores"],
                                                 ours["scores"])  # fmt: skip
        own, diff = check["own_orientations"], check["swapped_max_abs_diff"]
        print(f"TL EAP vs tl-noise EAP (resample): Pearson {own['pearson']:.3f}, Spearman "
              f"{own['spearman']:.3f}; roles swapped: max |diff| {diff:.2g} "
              f"(largest score {check['tl_max_score']:.3g})")  # fmt: skip
    return out


def _fmt(value: Any, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:{width}{spec}}"


def print_row(method: str, row: dict[str, Any], ablations: list[str]) -> None:
    if "error" in row:
        print(f"{method:26} {row['error'][:90]}")
        return
    areas = " ".join(f"{row['curves'][a]['cpr']:6.3f} {row['curves'][a]['cmd']:6.3f}"
                     for a in ablations)  # fmt: skip
    ext = row.get("extract", {})
    print(f"{method:26} {areas} {_fmt(ext.get('edges'), 'd', 5)} {_fmt(ext.get('prefix'), 'd', 6)} "
          f"{_fmt(row.get('roc_auc'), '.3f', 6)} {row['seconds']:7.1f} {row['forwards']:7.1f}",
          flush=True)  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cols = " ".join(f"CPR-{a[:3]} CMD-{a[:3]}" for a in args.ablations)
    print(f"columns: method, {cols}, edges (f>=0.9), prefix, AUC, seconds, forwards")
    began = time.perf_counter()
    results: dict[str, Any] = {
        "config": {"n": args.n, "eval_seed": EVAL_SEED, "fractions": list(EDGE_FRACTIONS),
                   "ablations": args.ablations, "threads": args.threads,
                   "hf_steps": args.hf_steps},
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "transformer_lens": version("transformer-lens")},
        "models": {name: run_model(name, args) for name in args.models},
    }  # fmt: skip
    results["wall_seconds"] = time.perf_counter() - began
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1, default=float))
    print(f"\nresults: {args.json}")
    return results


if __name__ == "__main__":
    main()
