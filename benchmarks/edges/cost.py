"""Cost of edge noise: one edge-noise fit step against a plain forward, peak memory against a
frozen forward + backward, and how both grow with the number of edges, measured side by side.

Usage (repository root)::

    .venv/bin/python -m benchmarks.edges.cost                  # GPT-2-small shape, CPU, 1 thread
    .venv/bin/python -m benchmarks.edges.cost --model tiny --layers 2 --rounds 1   # smoke
    .venv/bin/python -m benchmarks.edges.cost --profile         # + where an edge step's time goes

Workload (``--model gpt2-small``): 12 layers, 12 heads, d_model 768, d_mlp 3072, vocab 50257,
random weights (``tn.build_native_model``), batch 4 x 128 on the CPU; edge noise on every edge
(32,491 at 12 layers), KL objective, alphaless, as ``tn.fit`` does by default. The steps run
through :class:`tl_noise.fitting.Trainer` (``tn.fit`` without its end-of-fit circuit curve),
timed from ``on_step_start`` to ``on_step_end`` (:class:`benchmarks.perf.timing.StepTimer`: the
first step and the logged ones dropped); a plain forward (no gradients, no hooks) by
``torch.utils.benchmark``; a node-noise fit step (per-head noise on every ``hook_z``, the
``benchmarks.perf`` reference) and the edge-noised forward beside them. The variants run in
interleaved rounds; a ratio is the median over rounds of the ratio within a round.

Memory: the resident set of a fresh subprocess (the edge noise's pooled buffers given back
before the measured step, so it allocates them like any other tensor;
``MALLOC_MMAP_THRESHOLD_=65536``, peak reset with ``/proc/self/clear_refs``, ``VmHWM`` minus
``VmRSS`` before the measured step: the same meter as :mod:`benchmarks.perf.memory`) for one
edge-noise fit step and for a forward + backward with frozen weights reaching every ``hook_z``
through a zero offset (cross-entropy loss). ``--layers`` repeats time and memory at other
depths (the same shape otherwise). Results:
``benchmarks/results/edge_perf.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

import tl_noise as tn
from benchmarks.perf.memory import CLEAR_REFS, PeakMeter, StepWindow
from benchmarks.perf.settings import HOOKS, MODELS, ROOT
from benchmarks.perf.timing import (
    StepTimer,
    fit_steps,
    medians,
    paired_ratio,
    rounds,
    slope,
    time_op,
)
from benchmarks.perf.workload import make_tokens, offset_backward_fn
from tl_noise.fitting import Callback, FitConfig, Trainer
from tl_noise.fitting.inputs import prepare_data

RESULTS = ROOT / "benchmarks" / "results"
TARGETS = {"edge_fit_step/plain_forward": 3.0, "edge_fit_peak/forward_backward_peak": 2.0}
AIM = {"edge_fit_step/plain_forward": 2.5}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.edges.cost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--model", default="gpt2-small", choices=sorted(MODELS))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--pos", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds at full depth")
    p.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8, 12],
                   help="depths of the scaling rows (one round each; the model's own depth "
                   "reuses the main measurement)")  # fmt: skip
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--min-run-time", type=float, default=0.2)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--profile", action="store_true", help="torch.profiler over 2 edge steps")
    p.add_argument("--json", type=Path, default=RESULTS / "edge_perf.json")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--what", choices=["edge_fit", "fwdbwd"], help=argparse.SUPPRESS)
    p.add_argument("--depth", type=int, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.pos = min(args.pos, MODELS[args.model]["n_ctx"])
    return args


def build(args: argparse.Namespace, layers: int) -> Any:
    model = tn.build_native_model({**MODELS[args.model], "n_layers": layers}, device="cpu")
    model.eval()
    return model


def edge_steps(model: Any, noise: Any, tokens: torch.Tensor, batch: int, steps: int = 4,
               callbacks: list[Any] | None = None) -> list[float]:  # fmt: skip
    """Seconds of the plain steps of one Trainer run (``tn.fit``'s defaults otherwise)."""
    clock = StepTimer("cpu")
    data = prepare_data(model, noise, tokens, None, None, None)
    config = FitConfig(steps=steps, batch_size=batch, log_every=10**9, refine_window=0)
    Trainer(model, noise, data, config, callbacks=[clock, *(callbacks or [])]).fit()
    return clock.plain_steps()


def plain_forward(model: Any, batch: torch.Tensor, args: argparse.Namespace) -> float:
    with torch.no_grad():
        return time_op(lambda: model(batch), args.threads, args.min_run_time)


def measure(args: argparse.Namespace, layers: int, n_rounds: int, node: bool) -> dict[str, Any]:
    """Interleaved rounds of the plain forward, the edge step, the edge-noised forward and (with
    ``node``) the node-noise step, at ``layers`` layers."""
    model = build(args, layers)
    tokens = make_tokens(model, 2 * args.batch, args.pos)
    batch = tokens[: args.batch]
    edge = tn.attach_edge_noise(model, calibration_tokens=tokens[: args.batch])
    edge.remove()
    node_noise = tn.attach_noise(model, HOOKS, granularity="auto", calibration_tokens=tokens[:2])
    node_noise.remove()

    def with_noise(noise: Any, fn: Any) -> Any:
        noise.attach()
        try:
            return fn()
        finally:
            noise.remove()

    variants: dict[str, Any] = {
        "plain_forward": lambda: plain_forward(model, batch, args),
        "edge_fit_step": lambda: with_noise(edge, lambda: edge_steps(model, edge, tokens,
                                                                     args.batch)),
        "edge_noised_forward": lambda: with_noise(edge, lambda: plain_forward(model, batch, args)),
    }  # fmt: skip
    if node:
        variants["node_fit_step"] = lambda: with_noise(
            node_noise, lambda: fit_steps(model, node_noise, tokens, "cpu", args.batch)
        )
    samples = rounds(variants, n_rounds)
    pairs = {
        "edge_fit_step/plain_forward": ("edge_fit_step", "plain_forward"),
        "edge_noised_forward/plain_forward": ("edge_noised_forward", "plain_forward"),
    }
    if node:
        pairs["edge_fit_step/node_fit_step"] = ("edge_fit_step", "node_fit_step")
        pairs["node_fit_step/plain_forward"] = ("node_fit_step", "plain_forward")  # fmt: skip
    return {"layers": layers, "edges": edge.graph.n_edges, "seconds": medians(samples),
            "samples": samples,
            "ratios": {k: paired_ratio(samples, a, b) for k, (a, b) in pairs.items()}}  # fmt: skip


# ----------------------------------------------------------------------------- memory
class FreeBuffers(Callback):
    """Gives the edge noise's pooled buffers back at the start of step ``step``."""

    def __init__(self, noise: Any, step: int = 1) -> None:
        self.noise, self.step = noise, step

    def on_step_start(self, trainer: Any, step: int) -> None:
        if step == self.step:
            self.noise.free_buffers()


def memory_worker(args: argparse.Namespace) -> dict[str, Any]:
    model = build(args, args.depth)
    tokens = make_tokens(model, 2 * args.batch, args.pos)
    meter = PeakMeter("cpu")
    if args.what == "fwdbwd":
        step = offset_backward_fn(model, tokens[: args.batch])
        step()  # warm-up: first-time allocations
        meter.start()
        step()
        return meter.stop()
    noise = tn.attach_edge_noise(model, calibration_tokens=tokens[: args.batch])
    window = StepWindow(meter)
    # the buffers kept from the warm-up step are given back first: the measured step pays for
    # the writers' store and its gradient like any other tensor it needs
    edge_steps(model, noise, tokens, args.batch, steps=3, callbacks=[FreeBuffers(noise), window])
    return dict(window.marks)


def run_memory(args: argparse.Namespace, layers: int, what: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "mem.json"
        cmd = [sys.executable, "-m", "benchmarks.edges.cost", "--worker", "--what", what,
               "--depth", str(layers), "--out", str(out), "--model", args.model,
               "--batch", str(args.batch), "--pos", str(args.pos),
               "--threads", str(args.threads)]  # fmt: skip
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=3000)
        if proc.returncode != 0:
            raise RuntimeError(f"memory worker {what} failed:\n{proc.stderr[-2000:]}")
        return json.loads(out.read_text())


def memory(args: argparse.Namespace, layers: int) -> dict[str, Any]:
    fit, base = run_memory(args, layers, "edge_fit"), run_memory(args, layers, "fwdbwd")
    return {
        "edge_fit_step": fit,
        "forward_backward": base,
        "ratio": fit["delta_mb"] / base["delta_mb"] if base["delta_mb"] > 0 else None,
    }


# ---------------------------------------------------------------------------- profile
def profile(args: argparse.Namespace, layers: int) -> list[dict[str, Any]]:
    """The ops of two edge steps by self CPU time (``torch.profiler``)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    model = build(args, layers)
    tokens = make_tokens(model, 2 * args.batch, args.pos)
    noise = tn.attach_edge_noise(model, calibration_tokens=tokens[: args.batch])
    edge_steps(model, noise, tokens, args.batch, steps=2)  # warm-up
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        edge_steps(model, noise, tokens, args.batch, steps=2)
    noise.remove()
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:15]
    total = sum(e.self_cpu_time_total for e in prof.key_averages()) or 1.0
    return [{"op": e.key, "self_seconds": e.self_cpu_time_total / 1e6, "calls": e.count,
             "share": e.self_cpu_time_total / total} for e in events]  # fmt: skip


# ------------------------------------------------------------------------------- main
def report(result: dict[str, Any]) -> None:
    main = result["main"]
    print(
        f"\n{result['model']} ({main['layers']} layers, {main['edges']} edges), "
        f"batch {result['batch']} x {result['pos']}, CPU, {result['threads']} thread(s)"
    )
    for key, value in main["seconds"].items():
        print(f"  {key:22} {value:8.3f} s")
    for key, value in main["ratios"].items():
        target = TARGETS.get(key)
        print(f"  {key:34} {value:6.2f}" + (f"   (target <= {target})" if target else ""))
    mem = result.get("memory", {}).get(str(main["layers"]))
    if mem and mem["ratio"] is not None:
        print(f"  {'edge_fit_peak/forward_backward_peak':34} {mem['ratio']:6.2f}   (target <= 2.0;"
              f" {mem['edge_fit_step']['delta_mb']:.0f} vs "
              f"{mem['forward_backward']['delta_mb']:.0f} MiB)")  # fmt: skip
    print("  layers  edges  step/fwd  noised fwd/fwd  peak/fwd+bwd")
    for row in result["scaling"]:
        m = result.get("memory", {}).get(str(row["layers"]), {}).get("ratio")
        r = row["ratios"]
        print(f"  {row['layers']:6d} {row['edges']:6d} {r['edge_fit_step/plain_forward']:9.2f} "
              f"{r['edge_noised_forward/plain_forward']:15.2f} "
              f"{'-' if m is None else format(m, '.2f'):>13}")  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        out = memory_worker(args)
        args.out.write_text(json.dumps(out))
        return out
    depth = int(MODELS[args.model]["n_layers"])
    result: dict[str, Any] = {
        "model": args.model, "batch": args.batch, "pos": args.pos, "threads": args.threads,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "torch": torch.__version__},
        "targets": TARGETS, "aim": AIM,
        "memory_method": "fresh subprocess, MALLOC_MMAP_THRESHOLD_=65536, VmHWM after "
                         "clear_refs minus VmRSS (resident set, not tracemalloc)",
    }  # fmt: skip
    print(f"[time] {args.model}, {depth} layers, {args.rounds} rounds", flush=True)
    result["main"] = measure(args, depth, args.rounds, node=True)
    result["scaling"] = []
    for layers in sorted(set(args.layers)):
        print(f"[scaling] {layers} layers", flush=True)
        row = result["main"] if layers == depth else measure(args, layers, 1, node=False)
        result["scaling"].append({k: row[k] for k in ("layers", "edges", "seconds", "ratios")})
    if not args.no_memory and CLEAR_REFS.exists():
        result["memory"] = {}
        for layers in sorted(set(args.layers) | {depth}):
            print(f"[memory] {layers} layers", flush=True)
            result["memory"][str(layers)] = memory(args, layers)
    rows = result["scaling"]
    if len(rows) > 1:
        xs = [float(r["edges"]) for r in rows]
        ys = [r["ratios"]["edge_fit_step/plain_forward"] for r in rows]
        result["step_ratio_per_1000_edges"] = 1000 * slope(xs, ys)
    if args.profile:
        print("[profile]", flush=True)
        result["profile"] = profile(args, depth)
    ratios = dict(result["main"]["ratios"])
    mem = result.get("memory", {}).get(str(depth))
    if mem:
        ratios["edge_fit_peak/forward_backward_peak"] = mem["ratio"]
    result["met"] = {k: None if ratios.get(k) is None else bool(ratios[k] <= t)
                     for k, t in TARGETS.items()}  # fmt: skip
    report(result)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1, default=float))
    print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
