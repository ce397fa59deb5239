"""Time to answer on the embedded induction model: wall time from ``attach_noise`` until the
top-k set of heads (k = the labelled heads; a set with a tie at the k-th place does not count)
has not changed for ``window`` steps, against activation and attribution patching
(:mod:`tl_noise.evaluation.baselines`) on the same task and machine."""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

import tl_noise as tn
from benchmarks.perf.settings import HOOKS
from benchmarks.perf.timing import StepTimer

TopK = frozenset[int] | None


def top_k_sets(history: list[dict[str, Any]], names: list[str], k: int) -> list[TopK]:
    """The top-k heads by importance ``-log std`` after every step; None where the k-th and the
    (k+1)-th tie (the set is not well defined)."""
    tops: list[TopK] = []
    for record in history:
        imp = -torch.tensor([record["std"][n] for n in names]).log().reshape(-1)
        values, order = torch.sort(imp, descending=True)
        defined = k >= len(values) or bool(values[k - 1] > values[k])
        tops.append(frozenset(order[:k].tolist()) if defined else None)
    return tops


def first_stable(tops: list[TopK], window: int) -> int | None:
    """The first step ending ``window`` steps with one and the same defined top-k set."""
    for t in range(window - 1, len(tops)):
        if tops[t] is not None and len(set(tops[t - window + 1 : t + 1])) == 1:
            return t
    return None


def _timed_fit(
    model: Any, task: Any, args: argparse.Namespace
) -> tuple[Any, StepTimer, float, float]:
    """``(fit result, step clock, start, end)``: the clock starts before ``attach_noise``; the
    end is when ``fit`` returned (after its ranking refinement)."""
    clock = StepTimer(args.device)
    start = time.perf_counter()
    noise = tn.attach_noise(model, HOOKS, granularity="head", calibration_tokens=task.tokens)
    try:
        result = tn.fit(
            model,
            noise,
            task,
            steps=args.answer_steps,
            batch_size=32,
            lr=0.05,
            quiet=True,
            log_every=1,
            callbacks=[clock],
        )
    finally:
        noise.remove()
    return result, clock, start, time.perf_counter()


def _patching(model: Any, task: Any, truth: torch.Tensor) -> dict[str, Any]:
    from tl_noise.evaluation import roc_auc
    from tl_noise.evaluation.baselines import (
        activation_patching_scores,
        attribution_patching_scores,
    )

    out = {}
    for label, fn in (
        ("activation_patching", activation_patching_scores),
        ("attribution_patching", attribution_patching_scores),
    ):
        scores = fn(model, task, batch_size=32)
        out[label] = {"seconds": scores.seconds, "auc": roc_auc(scores.scores, truth)}
    return out


def section_answer(args: argparse.Namespace) -> dict[str, Any]:
    from tl_noise.evaluation import ground_truth_mask, roc_auc
    from tl_noise.tasks.induction import induction_task

    try:
        model = tn.load_embedded_model(device=args.device)
    except (FileNotFoundError, OSError, ValueError) as err:
        return {"skipped": f"embedded model not available ({err})"}
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    truth = ground_truth_mask(model.ground_truth, n_layers, n_heads)
    k, window = int(truth.sum()), 5 if args.quick else 20
    seq_len = min(int(model.cfg.n_ctx), 48)
    task = induction_task(
        int(model.cfg.d_vocab),
        n=64 if args.quick else 256,
        seq_len=seq_len,
        min_period=3,
        max_period=(seq_len - 1) // 2,
        seed=0,
        bos=0,
    )
    result, clock, start, end = _timed_fit(model, task, args)
    assert result.importance is not None  # per-head noise on every hook_z
    tops = top_k_sets(result.history, [f"blocks.{i}.attn.hook_z" for i in range(n_layers)], k)
    stable = first_stable(tops, window)
    out: dict[str, Any] = {
        "model": getattr(model, "tl_noise_name", "embedded"),
        "task": {"n": len(task), "seq_len": seq_len},
        "k": k,
        "window": window,
        "steps": args.answer_steps,
        "fit_seconds_total": clock.ends[-1] - start,
        "fit_return_seconds": end - start,  # with the ranking refinement after the steps
        "tl_noise_auc": roc_auc(result.importance, truth),
    }
    if stable is None:
        out["time_to_answer"] = None
        out["note"] = f"the top-{k} set never stayed fixed for {window} steps"
    else:
        # ends[t] is the end of step t; time counted from attach_noise (calibration, cache)
        out["time_to_answer"] = clock.ends[stable] - start
        out["answer_step"] = stable
        found = torch.zeros(n_layers * n_heads, dtype=torch.bool)
        found[list(tops[stable] or ())] = True
        out["answer_precision_at_k"] = float((found & truth.reshape(-1)).sum()) / k
        out["answer_equals_final_top_k"] = tops[stable] == tops[-1]
    return {**out, **_patching(model, task, truth)}
