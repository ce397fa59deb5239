"""Peak memory of one fit step against a forward + backward with frozen weights.

CUDA: ``torch.cuda.max_memory_allocated`` above the memory allocated before the step (allocator
statistics are per process and resettable, so this runs in the benchmark process).

CPU: tensor storage comes from torch's own allocator, which ``tracemalloc`` does not see, so the
measure is the process's resident set. Each measurement runs in a fresh subprocess with
``MALLOC_MMAP_THRESHOLD_=65536`` (glibc then returns every freed block above 64 KiB at once, so
RSS follows the live tensors); after one warm-up step the peak RSS is reset
(``/proc/self/clear_refs``) and the peak is ``VmHWM`` minus ``VmRSS`` before the measured step.
``resource.getrusage`` gives the lifetime peak of the process beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

import tl_noise as tn
from benchmarks.perf.settings import ROOT
from benchmarks.perf.workload import attach, build_model, make_tokens, offset_backward_fn
from tl_noise.fitting import Callback

CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class PeakMeter:
    """Peak memory above a baseline: CUDA allocator statistics, or the RSS high-water mark."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.base = 0

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            CLEAR_REFS.write_text("5")
            self.base = _status_kb("VmRSS") * 1024

    def stop(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _status_kb("VmHWM") * 1024
        return {
            "base_mb": self.base / 2**20,
            "peak_mb": peak / 2**20,
            "delta_mb": (peak - self.base) / 2**20,
        }


class StepWindow(Callback):
    """Meters fit step ``step`` alone, from ``on_step_start`` to ``on_step_end``."""

    def __init__(self, meter: PeakMeter, step: int = 1) -> None:
        self.meter, self.step = meter, step
        self.marks: dict[str, float] = {}

    def on_step_start(self, trainer: Any, step: int) -> None:
        if step == self.step:
            self.meter.start()

    def on_step_end(self, trainer: Any, step: int, record: dict[str, Any] | None) -> None:
        if step == self.step:
            self.marks = self.meter.stop()


def memory_worker(args: argparse.Namespace) -> dict[str, Any]:
    """One measurement in this (fresh) process: ``--what fit`` or ``--what fwdbwd``."""
    model = build_model(args)
    tokens = make_tokens(model, 2 * args.batch, args.pos)
    meter = PeakMeter(args.device)
    if args.what == "fwdbwd":
        step = offset_backward_fn(model, tokens[: args.batch].to(args.device))
        step()  # warm-up: first-time allocations
        meter.start()
        step()
        marks = meter.stop()
    else:
        noise = attach(model, tokens)
        window = StepWindow(meter)
        tn.fit(
            model,
            noise,
            tokens,
            steps=3,
            batch_size=args.batch,
            quiet=True,
            log_every=10**9,
            refine_window=0,
            callbacks=[window],
        )
        marks = dict(window.marks)
        noise.remove()
    if not meter.cuda:
        marks["ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return marks


def worker_command(args: argparse.Namespace, worker: str, out: Path, python: str) -> list[str]:
    """``python -m benchmarks.perf --worker ...`` with this run's workload settings."""
    return [
        python,
        "-m",
        "benchmarks.perf",
        "--worker",
        worker,
        "--out",
        str(out),
        "--model",
        args.model,
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--threads",
        str(args.threads),
        "--batch",
        str(args.batch),
        "--pos",
        str(args.pos),
        "--rounds",
        str(args.rounds),
        "--min-run-time",
        str(args.min_run_time),
    ]


def run_memory_worker(args: argparse.Namespace, what: str) -> dict[str, Any]:
    if args.device.startswith("cuda"):  # allocator statistics are resettable in-process
        return memory_worker(argparse.Namespace(**{**vars(args), "what": what}))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "mem.json"
        cmd = [*worker_command(args, "mem", out, sys.executable), "--what", what]
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"memory worker {what} failed:\n{proc.stderr[-2000:]}")
        return json.loads(out.read_text())


def section_memory(args: argparse.Namespace) -> dict[str, Any]:
    cuda = args.device.startswith("cuda")
    if not cuda and not CLEAR_REFS.exists():
        return {"skipped": "needs Linux /proc (peak RSS reset) or CUDA"}
    fit = run_memory_worker(args, "fit")
    base = run_memory_worker(args, "fwdbwd")
    out = {
        "method": "torch.cuda.max_memory_allocated"
        if cuda
        else "subprocess, MALLOC_MMAP_THRESHOLD_=65536, VmHWM after clear_refs, minus VmRSS",
        "fit_step": fit,
        "forward_backward": base,
        "ratio_delta": fit["delta_mb"] / base["delta_mb"] if base["delta_mb"] > 0 else None,
        "ratio_absolute": fit["peak_mb"] / base["peak_mb"],
    }
    if out["ratio_delta"] is None:
        out["note"] = "the forward + backward added no measurable memory (model too small)"
    return out
