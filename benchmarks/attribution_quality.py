"""How well does tl-noise find a known circuit, next to mean ablation and (attribution) patching?

Usage::

    .venv/bin/python benchmarks/attribution_quality.py [--model induction-2l|NAME|DIR]
        [--labels labels.json] [--steps N] [--json out.json]

On an induction task (periodic random tokens, :func:`tl_noise.tasks.induction.induction_task`)
it fits per-head noise on ``blocks.*.attn.hook_z`` (objective ``kl``, mode ``alphaless``, loss
mask from the task), computes the three baselines of
:mod:`tl_noise.evaluation.baselines`, and prints per
method: ROC AUC of the head scores against the labelled heads, faithfulness of the top-k circuit
(k = number of labelled heads; all other heads mean-ablated) and wall time. The JSON goes to
``benchmarks/results/attribution_quality-<model>.json`` unless ``--json`` says otherwise.

Any TransformerLens model works (hub name or local directory, via :func:`tl_noise.load_model`)
with a labels JSON in the embedded model's format, ``{"induction": [[layer, head], ...], ...}``
(optionally under a top-level ``"ground_truth"`` key); the embedded model carries its own labels.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import math
import re
import time
from pathlib import Path
from typing import Any

import torch

import tl_noise as tn
from tl_noise.evaluation import HeadScores, compare_methods, ground_truth_mask, head_importance
from tl_noise.fitting import fit
from tl_noise.io import read_json, write_json
from tl_noise.tasks.base import Task
from tl_noise.tasks.induction import induction_task

RESULTS = Path(__file__).parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="induction-2l", help="hub name, local dir or induction-2l")
    p.add_argument("--labels", help="JSON of ground-truth heads (default: model.ground_truth)")
    p.add_argument("--steps", type=int, default=300, help="noise fitting steps")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--n", type=int, default=256, help="induction sequences")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default min(n_ctx, 48))")
    p.add_argument("--bos", type=int, help="BOS id (default: the tokenizer's, else 0)")
    p.add_argument("--ablation", choices=["mean", "resample"], default="mean",
                   help="how heads outside the circuit are ablated for faithfulness")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--json", type=Path, help="output path (default under benchmarks/results/)")
    return p.parse_args(argv)


def load_labels(model: Any, path: str | None) -> dict[str, list[list[int]]]:
    if path is None:
        if getattr(model, "ground_truth", None) is None:
            raise SystemExit("this model has no built-in ground truth; pass --labels labels.json")
        return model.ground_truth
    labels = read_json(path, "labels")
    labels = labels.get("ground_truth", labels) if isinstance(labels, dict) else labels
    if not isinstance(labels, dict):
        raise SystemExit(f"{path}: expected {{class: [[layer, head], ...]}}, got {labels!r:.80}")
    return labels


def make_task(model: Any, args: argparse.Namespace) -> Task:
    """Periodic random tokens over the model's vocabulary, BOS first; periods up to half."""
    cfg = model.cfg
    seq_len = args.seq_len or min(int(cfg.n_ctx), 48)
    bos = args.bos
    if bos is None:
        tokenizer = getattr(model, "tokenizer", None)
        bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
        bos = 0 if bos is None else int(bos)
    return induction_task(int(cfg.d_vocab), n=args.n, seq_len=seq_len, min_period=3,
                          max_period=(seq_len - 1) // 2, seed=args.seed, bos=bos)  # fmt: skip


def fit_noise(model: Any, task: Task, args: argparse.Namespace) -> HeadScores:
    """Fit per-head noise on hook_z; importance ``-log(std)`` and the wall time of attach + fit."""
    start = time.perf_counter()
    noise = tn.attach_noise(model, "blocks.*.attn.hook_z", granularity="head",
                            calibration_tokens=task.tokens, seed=args.seed)  # fmt: skip
    try:
        fit(model, noise, task.tokens, loss_mask=task.loss_mask, objective="kl",
               mode="alphaless", steps=args.steps, lr=args.lr, batch_size=args.batch_size,
               seed=args.seed, run_dir=None, quiet=True)  # fmt: skip
        importance = head_importance(noise)
    finally:
        noise.remove()  # the baselines must see the clean model
    return HeadScores(importance, time.perf_counter() - start)


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'method':<22}{'AUC':>7}{'faithful@k':>12}{'k':>4}{'seconds':>10}")
    for r in rows:
        print(f"{r['method']:<22}{r['auc']:>7.3f}{r['faithfulness_at_k']:>12.3f}"
              f"{r['circuit_size']:>4}{r['seconds']:>10.2f}")  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    model = tn.load_model(args.model, device=args.device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    labels = load_labels(model, args.labels)
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    truth = ground_truth_mask(labels, n_layers, n_heads)
    task = make_task(model, args)
    noise = fit_noise(model, task, args)
    rows = compare_methods(model, task, noise, truth, method=args.ablation,
                           batch_size=args.batch_size, seed=args.seed)  # fmt: skip
    print(f"model {args.model}: {n_layers} layers x {n_heads} heads, {int(truth.sum())} labelled; "
          f"task {task.name} {list(task.tokens.shape)}, {args.steps} noise steps")  # fmt: skip
    print_table(rows)
    report = {
        "model": args.model,
        "labels": labels,
        "task": {"name": task.name, **task.info},
        "fit": {
            "hooks": "blocks.*.attn.hook_z",
            "granularity": "head",
            "objective": "kl",
            "mode": "alphaless",
            "steps": args.steps,
            "lr": args.lr,
            "batch_size": args.batch_size,
            "seed": args.seed,
        },  # fmt: skip
        "faithfulness_ablation": args.ablation,
        "rows": [
            {
                k: (v if not (isinstance(v, float) and math.isnan(v)) else None)
                for k, v in row.items()
            }
            for row in rows
        ],  # fmt: skip
        "device": str(next(model.parameters()).device),
        "versions": {pkg: importlib.metadata.version(pkg) for pkg in ("torch", "transformer-lens")},
    }
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(args.model).name or args.model)
    out = args.json or RESULTS / f"attribution_quality-{slug}.json"
    write_json(out, report)
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
