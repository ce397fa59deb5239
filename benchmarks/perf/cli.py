"""Command line: ``python -m benchmarks.perf [--quick] [--model tiny] ...`` (or
``python benchmarks/perf.py ...``); the workers run by the memory and 3.x sections."""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

from benchmarks.perf.settings import (
    MODELS,
    RATIO_KEYS,
    RATIO_SECTIONS,
    RESULTS,
    SECTIONS,
    TARGETS,
    TOKENS_PER_SECOND,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="benchmarks.perf",
        description=("Speed and memory of tl-noise: ratios against a plain forward pass."),
    )
    p.add_argument("--model", default="gpt2-small", choices=sorted(MODELS))
    p.add_argument("--quick", action="store_true", help="fewer rounds, smaller batch (CI smoke)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=1, help="torch threads in every process")
    p.add_argument("--batch", type=int, help="examples per batch (default 4, quick 2)")
    p.add_argument("--pos", type=int, help="tokens per example (default 128, quick 32)")
    p.add_argument("--rounds", type=int, help="interleaved measurement rounds (default 3)")
    p.add_argument(
        "--min-run-time",
        type=float,
        help="seconds per single-operation measurement (default 0.2, quick 0.1)",
    )
    p.add_argument(
        "--sections", default=",".join(SECTIONS), help="comma list of " + ", ".join(SECTIONS)
    )
    p.add_argument("--answer-steps", type=int, help="fit steps on the embedded model (300)")
    p.add_argument(
        "--compare-ref",
        help="also time noised forward and fit step at this git "
        "revision (a git worktree, measured in fresh processes)",
    )
    p.add_argument("--json", type=Path, help="output path (default under benchmarks/results/)")
    p.add_argument("--worker", choices=["mem", "tl3"], help=argparse.SUPPRESS)
    p.add_argument("--what", choices=["fit", "fwdbwd"], help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.batch = args.batch or (2 if args.quick else 4)
    args.pos = min(args.pos or (32 if args.quick else 128), MODELS[args.model]["n_ctx"])
    args.rounds = args.rounds or (2 if args.quick else 3)
    args.min_run_time = args.min_run_time or (0.1 if args.quick else 0.2)
    args.answer_steps = args.answer_steps or (40 if args.quick else 300)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        p.error(f"unknown sections {unknown}; accepted: {', '.join(SECTIONS)}")
    return args


def new_report(args: argparse.Namespace) -> dict[str, Any]:
    config = {k: v for k, v in vars(args).items() if k not in ("worker", "what", "out")}
    config["json"] = str(args.json) if args.json else None
    return {
        "config": config,
        "model_config": MODELS[args.model],
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "transformer_lens": version("transformer-lens"),
            "threads": torch.get_num_threads(),
        },
        "targets": TARGETS,
        "ratios": dict.fromkeys(RATIO_KEYS),
        "notes": {},
    }


def _in_process_sections(args: argparse.Namespace, report: dict[str, Any]) -> None:
    from benchmarks.perf.sections import section_logging, section_ratios, section_scaling
    from benchmarks.perf.workload import build_model, make_tokens

    sections, ratios = set(args.sections), report["ratios"]
    model = build_model(args)
    tokens = make_tokens(model, 2 * args.batch, args.pos)
    if "ratios" in sections or "tl3" in sections:
        print(
            f"[ratios] {args.model} batch {args.batch}x{args.pos}, {args.rounds} rounds", flush=True
        )
        out = section_ratios(args, model, tokens)
        ratios.update(out.pop("ratios"))
        report.update(out)
        n = args.batch * args.pos
        report["tokens_per_second"] = {k: n / out["seconds"][k] for k in TOKENS_PER_SECOND}
        rates = ", ".join(f"{k} {v:.0f}" for k, v in report["tokens_per_second"].items())
        print(f"tokens per second: {rates}", flush=True)
    fit_step = report.get("seconds", {}).get("fit_step")
    if "logging" in sections:
        print("[logging]", flush=True)
        report["logging"] = log = section_logging(args, model, tokens)
        if fit_step:
            ratios["record/fit_step"] = log["hook_z"]["record_seconds"] / fit_step
            ratios["checkpoint/fit_step"] = log["hook_z"]["checkpoint_seconds"] / fit_step
    if "scaling" in sections:
        print("[scaling]", flush=True)
        report["scaling"] = sc = section_scaling(args, model, tokens)
        ratios["extra_hook_point/plain_forward"] = (
            sc["extra_hook_point_step_seconds (many hooks, mean)"] / sc["plain_forward"]
        )
        ratios["fit_step/plain_forward per layer"] = sc["layers"].get(
            "fit_step/plain_forward per layer"
        )


def _other_processes(args: argparse.Namespace, report: dict[str, Any]) -> None:
    from benchmarks.perf.answer import section_answer
    from benchmarks.perf.memory import section_memory
    from benchmarks.perf.workers import section_compare, section_tl3

    sections, ratios = set(args.sections), report["ratios"]
    if "memory" in sections:
        print("[memory]", flush=True)
        report["memory"] = mem = section_memory(args)
        ratios["fit_peak_memory/forward_backward_peak_memory"] = mem.get("ratio_delta")
    if "tl3" in sections:
        print("[tl3]", flush=True)
        report["tl3"] = section_tl3(args, report["seconds"])
        ratios.update(report["tl3"].get("ratios", {}))
    if "answer" in sections:
        print("[answer]", flush=True)
        report["answer"] = ans = section_answer(args)
        if ans.get("time_to_answer") is not None:
            for label in ("activation_patching", "attribution_patching"):
                ratios[f"time_to_answer/{label}"] = ans["time_to_answer"] / ans[label]["seconds"]
    if args.compare_ref:
        print(f"[compare {args.compare_ref}]", flush=True)
        report["compare_ref"] = section_compare(args)


def _notes(args: argparse.Namespace, report: dict[str, Any]) -> None:
    """Say why a ratio of the table is missing: its section did not run, was skipped, or could
    not measure it (the section's ``note``)."""
    ran = set(args.sections) | ({"ratios"} if "tl3" in args.sections else set())
    for key, section in RATIO_SECTIONS.items():
        found = report.get(section, {})
        if section not in ran:
            report["notes"][section] = "section not run"
        elif "skipped" in found:
            report["notes"][section] = found["skipped"]
        elif report["ratios"].get(key) is None:
            report["notes"].setdefault(section, found.get("note", f"{key} not measured"))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.worker:
        return run_worker(args)
    from benchmarks.perf.report import details, ratio_table, seconds_table, write_json

    report = new_report(args)
    began = time.perf_counter()
    if {"ratios", "tl3", "logging", "scaling"} & set(args.sections):
        _in_process_sections(args, report)
    _other_processes(args, report)
    ratios = report["ratios"]
    report["met"] = {
        k: None if ratios.get(k) is None else bool(ratios[k] <= t) for k, t in TARGETS.items()
    }
    report["wall_seconds"] = time.perf_counter() - began
    _notes(args, report)
    if "seconds" in report:
        print(seconds_table(report["seconds"]))
    print(details(report))
    print(ratio_table(report))
    for key, note in report["notes"].items():
        print(f"note ({key}): {note}")
    suffix = "-quick" if args.quick else ""
    path = args.json or RESULTS / f"perf-{args.device.split(':')[0]}-{args.model}{suffix}.json"
    print(f"wrote {write_json(report, path)}")
    return report


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    """``--worker mem|tl3``: one measurement for the parent process, written to ``--out``."""
    if args.worker == "mem":
        from benchmarks.perf.memory import memory_worker

        result = memory_worker(args)
    else:
        from benchmarks.perf.workers import tl3_worker

        result = tl3_worker(args)
    args.out.write_text(json.dumps(result))
    return result
