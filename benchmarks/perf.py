"""Speed and memory of tl-noise: ratios against a plain forward pass, measured side by side.

Usage::

    .venv/bin/python benchmarks/perf.py                      # GPT-2-small shape, CPU, 1 thread
    .venv/bin/python benchmarks/perf.py --quick --model tiny  # CI smoke (seconds)
    .venv/bin/python benchmarks/perf.py --device cuda --dtype bf16
    .venv/bin/python benchmarks/perf.py --sections ratios,logging --compare-ref 3c418f5
    # 3c418f5: the trainer before the optimisations measured here

What is measured (``--model gpt2-small``: 12 layers, d_model 768, 12 heads, vocab 50257, random
weights, built offline; batch 4 x 128; per-head noise on every ``hook_z``):

1. noised forward / plain forward (both without gradients).
2. fit step (KL objective, alphaless) / plain forward; beside it the step with the clean targets
   recomputed every batch (``clean_cache_mb=0``) and a naive step (clean forward + noised forward
   + backward, the textbook KL, every step).
3. alphaless step / composite step.
4. peak memory of a fit step / peak memory of a forward + backward with frozen weights (the
   backward reaches the same ``hook_z`` activations through zero offsets, loss cross-entropy).
   CUDA: ``torch.cuda.max_memory_allocated`` above the memory allocated before the step. CPU:
   each measurement runs in a fresh subprocess with ``MALLOC_MMAP_THRESHOLD_=65536`` (glibc then
   returns every freed block above 64 KiB at once, so RSS follows the live tensors); after one
   warm-up step the peak RSS is reset (``/proc/self/clear_refs``) and the peak is ``VmHWM``
   minus ``VmRSS`` before the measured step. Ratios are of these increments; absolute peaks are
   in the JSON too.
5. scaling: step time vs number of noised hook points (the first k ``hook_z``, then 8 hook points
   per layer) and vs number of layers; the cost of one extra hook point (least-squares slope).
6. TransformerLens 4.x bridge vs 3.x ``HookedTransformer``: the 3.x numbers come from this script
   run as a subprocess by ``.venv-tl3/bin/python`` (``n/a`` without that environment).
7. time to answer on the embedded induction model: wall time from ``attach_noise`` until the
   top-k set of heads (k = the labelled heads; a set with a tie at the k-th place does not count)
   has not changed for 20 steps, vs activation patching and attribution patching
   (:mod:`tl_noise.evaluation.baselines`) on the same task and machine.

Method: one process; the variants of a measurement run in interleaved rounds after warm-up (the
machine may be shared). A ratio is the median over rounds of the ratio of the two medians within
a round, so load that drifts between rounds cancels; ``ratio_of_medians`` in the JSON gives the
ratio of the overall medians as well. Fit steps are timed inside ``fit``: this script replaces
``tl_noise.train.tqdm`` by a clock that stamps every iteration, so the setup (the clean-target
cache) is excluded; the first step of every call (first-time allocations) and the last (the only
one that writes a history record, ``log_every`` being larger than the run) are dropped. The
history record (``_record``) and a checkpoint are timed on their own. ``--compare-ref REF``
also times ``fit`` and the noise layer's forward as they were at git revision REF (e.g. before an
optimisation), in the same rounds. Threads: ``--threads`` (default 1), applied to every process.
Results: a table on stdout and JSON under ``benchmarks/results/``
(``perf-<device>-<model>[-quick].json``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import tl_noise as tn
import tl_noise.fitting.trainer as train_module
from tl_noise.fitting.objectives import kl_divergence, noise_loss
from tl_noise.fitting.projection import alphaless_gradients
from tl_noise.noise.layer import NoiseLayer

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
TL3_PYTHON = ROOT / ".venv-tl3" / "bin" / "python"
HOOKS = "blocks.*.attn.hook_z"
MODELS = {
    "gpt2-small": dict(n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072,
                       d_vocab=50257, n_ctx=1024, act_fn="gelu", seed=0),
    "tiny": dict(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, d_vocab=50, n_ctx=64,
                 act_fn="gelu", seed=0),
}  # fmt: skip
# hook points per layer for the "many hook points" point of the scaling curve
MANY_HOOKS = (
    "blocks.*.hook_resid_pre",
    "blocks.*.attn.hook_q",
    "blocks.*.attn.hook_k",
    "blocks.*.attn.hook_v",
    "blocks.*.attn.hook_z",
    "blocks.*.hook_attn_out",
    "blocks.*.mlp.hook_post",
    "blocks.*.hook_mlp_out",
)
TARGETS = {
    "noised_forward/plain_forward": 1.05,
    "fit_step/plain_forward": 2.1,
    "alphaless_step/composite_step": 1.05,
    "fit_peak_memory/forward_backward_peak_memory": 1.1,
}
RATIO_KEYS = (
    "noised_forward/plain_forward",
    "fit_step/plain_forward",
    "fit_step_uncached/plain_forward",
    "naive_step/plain_forward",
    "naive_step/fit_step",
    "alphaless_step/composite_step",
    "fit_peak_memory/forward_backward_peak_memory",
    "record/fit_step",
    "extra_hook_point/plain_forward",
    "tl4/tl3 plain_forward",
    "tl4/tl3 noised_forward",
    "tl4/tl3 fit_step",
    "time_to_answer/activation_patching",
    "time_to_answer/attribution_patching",
)
SECTIONS = ("ratios", "logging", "memory", "scaling", "tl3", "answer")


# ----------------------------------------------------------------------------- arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gpt2-small", choices=sorted(MODELS))
    p.add_argument("--quick", action="store_true", help="fewer rounds, smaller batch (CI smoke)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=1, help="torch threads in every process")
    p.add_argument("--batch", type=int, help="examples per batch (default 4, quick 2)")
    p.add_argument("--pos", type=int, help="tokens per example (default 128, quick 32)")
    p.add_argument("--rounds", type=int, help="interleaved measurement rounds (default 3)")
    p.add_argument(
        "--sections", default=",".join(SECTIONS), help="comma list of " + ", ".join(SECTIONS)
    )
    p.add_argument("--answer-steps", type=int, help="fit steps on the embedded model (300)")
    p.add_argument("--compare-ref", help="also time fit/noise forward as of this git revision")
    p.add_argument("--json", type=Path, help="output path (default under benchmarks/results/)")
    p.add_argument("--worker", choices=["mem", "tl3"], help=argparse.SUPPRESS)
    p.add_argument("--what", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.batch = args.batch or (2 if args.quick else 4)
    args.pos = min(args.pos or (32 if args.quick else 128), MODELS[args.model]["n_ctx"])
    args.rounds = args.rounds or (2 if args.quick else 3)
    args.answer_steps = args.answer_steps or (40 if args.quick else 300)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        p.error(f"unknown sections {unknown}; accepted: {', '.join(SECTIONS)}")
    return args


# ------------------------------------------------------------------------------ helpers
def dtype_of(args: argparse.Namespace) -> torch.dtype:
    return torch.bfloat16 if args.dtype == "bf16" else torch.float32


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build_model(args: argparse.Namespace, **overrides: Any) -> Any:
    """The benchmark model, as a user would have it: weights left requiring grad (``fit``
    freezes them for its own forward passes)."""
    model = tn.build_native_model({**MODELS[args.model], **overrides}, device=args.device)
    if args.dtype != "fp32":
        model = model.to(dtype_of(args))
    model.eval()
    return model


def make_tokens(model: Any, n: int, pos: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, int(model.cfg.d_vocab), (n, pos), generator=gen)


def attach(model: Any, tokens: torch.Tensor, hooks: Any = HOOKS) -> Any:
    return tn.attach_noise(model, hooks, granularity="auto", calibration_tokens=tokens[:2])


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else math.nan


class StepClock:
    """Stands in for ``tqdm`` in the trainer: stamps each iteration of the fit loop.

    ``on_iter(i)`` (optional) runs at the start of iteration ``i``, before its stamp.
    """

    def __init__(self, device: str, on_iter: Callable[[int], None] | None = None) -> None:
        self.device, self.on_iter, self.stamps = device, on_iter, []

    def __call__(self, iterable: Any, **_: Any) -> StepClock:
        self.iterable = iterable
        return self

    def __iter__(self) -> Iterator[Any]:
        for i, item in enumerate(self.iterable):
            sync(self.device)
            if self.on_iter is not None:
                self.on_iter(i)
            self.stamps.append(time.perf_counter())
            yield item
        sync(self.device)
        self.stamps.append(time.perf_counter())

    def set_postfix(self, **_: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def steps(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:], strict=False)]


@contextlib.contextmanager
def clocked(clock: StepClock, module: Any = train_module) -> Iterator[StepClock]:
    saved = module.tqdm
    module.tqdm = clock
    try:
        yield clock
    finally:
        module.tqdm = saved


def fit_steps(
    model: Any, noise: Any, tokens: torch.Tensor, args: argparse.Namespace, steps: int = 4,
    module: Any = train_module, **kwargs: Any,
) -> list[float]:  # fmt: skip
    """Seconds of each fit step but the first (first-step allocations) and the last (the only
    one that writes a history record with ``log_every`` this large); setup is not timed."""
    clock = StepClock(args.device)
    opts = dict(steps=steps, batch_size=args.batch, lr=0.05, quiet=True, log_every=10**9)
    with clocked(clock, module):
        module.fit(model, noise, tokens, **{**opts, **kwargs})
    return clock.steps()[1:-1]


def timed(fn: Callable[[], Any], device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def rounds(
    variants: dict[str, Callable[[], list[float] | float]],
    n_rounds: int,
    warmup: tuple[str, ...] = ("plain_forward", "noised_forward", "naive_step"),
) -> dict[str, list[list[float]]]:
    """Run every variant once per round (order rotated each round): samples per variant and
    round. The variants named in ``warmup`` run once first, unrecorded (fit steps drop their own
    first step instead)."""
    names = list(variants)
    for name in names:
        if name in warmup:
            variants[name]()
    samples: dict[str, list[list[float]]] = {name: [] for name in names}
    for r in range(n_rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            out = variants[name]()
            samples[name].append(out if isinstance(out, list) else [out])
    return samples


def medians(samples: dict[str, list[list[float]]]) -> dict[str, float]:
    return {name: median([x for r in rounds_ for x in r]) for name, rounds_ in samples.items()}


def paired_ratio(samples: dict[str, list[list[float]]], a: str, b: str) -> float:
    """Median over rounds of ``median(a) / median(b)`` within the round: the two were measured
    minutes apart at most, so a load that drifts between rounds cancels."""
    return median([median(x) / median(y) for x, y in zip(samples[a], samples[b], strict=True)])


def plain_forward(model: Any, noise: Any, tokens: torch.Tensor, device: str) -> float:
    noise.remove()
    try:
        with torch.no_grad():
            return timed(lambda: model(tokens), device)
    finally:
        noise.attach()


def noised_forward(model: Any, tokens: torch.Tensor, device: str) -> float:
    with torch.no_grad():
        return timed(lambda: model(tokens), device)


def naive_step(
    model: Any, noise: Any, tokens: torch.Tensor, opt: torch.optim.Optimizer, device: str
) -> float:
    """Clean forward + noised forward + backward, textbook KL; weights as the user has them."""
    params = [p for p in noise.parameters() if p.requires_grad]
    layers = [layer for _, layer in noise.items()]

    def step() -> None:
        with torch.no_grad():
            noise.set_mode("off")
            clean = model(tokens)
            noise.set_mode("sample")
            clean_lp = torch.log_softmax(clean.float(), dim=-1)
        logits = model(tokens)
        vocab = logits.shape[-1]
        task = kl_divergence(clean_lp.reshape(-1, vocab), logits.reshape(-1, vocab))
        n_loss = noise_loss([layer.std_for_loss() for layer in layers])
        g_n = torch.autograd.grad(n_loss, params)
        g_t = torch.autograd.grad(task, params)
        for p, g in zip(params, alphaless_gradients(g_n, g_t), strict=True):
            p.grad = g
        opt.step()
        opt.zero_grad(set_to_none=True)
        task.item()

    return timed(step, device)


# ---------------------------------------------------------------- revision comparison
def load_ref(ref: str) -> tuple[Any, Callable]:
    """``(train module, NoiseLayer.forward)`` as of git revision ``ref``."""
    mods = []
    for name in ("train", "layers"):
        source = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{ref}:tl_noise/{name}.py"],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
        spec = importlib.util.spec_from_loader(f"tl_noise._ref_{name}", loader=None)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        exec(compile(source, f"{ref}:tl_noise/{name}.py", "exec"), module.__dict__)
        mods.append(module)
    return mods[0], mods[1].NoiseLayer.forward


@contextlib.contextmanager
def layer_forward(forward: Callable | None) -> Iterator[None]:
    saved = NoiseLayer.forward
    if forward is not None:
        NoiseLayer.forward = forward
    try:
        yield
    finally:
        NoiseLayer.forward = saved


# --------------------------------------------------------------------------- sections
def section_ratios(args: argparse.Namespace, out: dict[str, Any]) -> dict[str, Any]:
    model = build_model(args)
    tokens = make_tokens(model, 2 * args.batch, args.pos)
    batch = tokens[: args.batch].to(args.device)
    noise = attach(model, tokens)
    opt = torch.optim.Adam(noise.param_groups(0.05))
    ref = load_ref(args.compare_ref) if args.compare_ref else None
    variants: dict[str, Callable] = {
        "plain_forward": lambda: plain_forward(model, noise, batch, args.device),
        "noised_forward": lambda: noised_forward(model, batch, args.device),
        "fit_step": lambda: fit_steps(model, noise, tokens, args),
        "composite_step": lambda: fit_steps(model, noise, tokens, args, mode="composite"),
        "fit_step_uncached": lambda: fit_steps(model, noise, tokens, args, clean_cache_mb=0),
        "naive_step": lambda: naive_step(model, noise, batch, opt, args.device),
    }
    if ref is not None:
        ref_train, ref_forward = ref

        def ref_noised() -> float:
            with layer_forward(ref_forward):
                return noised_forward(model, batch, args.device)

        def ref_fit() -> list[float]:
            with layer_forward(ref_forward):
                return fit_steps(model, noise, tokens, args, module=ref_train)

        variants["noised_forward@ref"] = ref_noised
        variants["fit_step@ref"] = ref_fit
    samples = rounds(variants, args.rounds)
    med = medians(samples)
    noise.remove()
    out["seconds"] = med
    out["samples"] = samples
    pairs = {
        "noised_forward/plain_forward": ("noised_forward", "plain_forward"),
        "fit_step/plain_forward": ("fit_step", "plain_forward"),
        "fit_step_uncached/plain_forward": ("fit_step_uncached", "plain_forward"),
        "naive_step/plain_forward": ("naive_step", "plain_forward"),
        "naive_step/fit_step": ("naive_step", "fit_step"),
        "alphaless_step/composite_step": ("fit_step", "composite_step"),
    }
    if ref is not None:
        pairs.update({
            "noised_forward/plain_forward@ref": ("noised_forward@ref", "plain_forward"),
            "fit_step/plain_forward@ref": ("fit_step@ref", "plain_forward"),
            "speedup fit_step (ref/now)": ("fit_step@ref", "fit_step"),
            "speedup noised_forward (ref/now)": ("noised_forward@ref", "noised_forward"),
        })  # fmt: skip
    ratios = {key: paired_ratio(samples, a, b) for key, (a, b) in pairs.items()}
    out["ratio_of_medians"] = {key: med[a] / med[b] for key, (a, b) in pairs.items()}
    if ref is not None:
        out["compare_ref"] = {"ref": args.compare_ref}
        for key in list(ratios):
            if key.endswith("@ref") or key.startswith("speedup"):
                out["compare_ref"][key] = ratios.pop(key)
    out["model"] = model
    out["tokens"] = tokens
    return ratios


def section_logging(
    args: argparse.Namespace, model: Any, tokens: torch.Tensor, ref_train: Any = None
) -> dict[str, Any]:
    """Seconds of one history record and of one checkpoint, for per-head noise on every
    ``hook_z`` and for the many-hook-points configuration."""
    out = {}
    for label, hooks in (("hook_z", HOOKS), ("many", list(MANY_HOOKS))):
        out[label] = _logging_costs(args, model, tokens, hooks, ref_train)
    return out


def _logging_costs(
    args: argparse.Namespace, model: Any, tokens: torch.Tensor, hooks: Any, ref_train: Any
) -> dict[str, Any]:
    from tl_noise.runs import RunWriter

    noise = attach(model, tokens, hooks)
    try:
        params = [p for p in noise.parameters() if p.requires_grad]
        gen = torch.Generator(device=params[0].device).manual_seed(0)
        g_n = [torch.randn(p.shape, generator=gen, device=p.device) for p in params]
        g_t = [torch.randn(p.shape, generator=gen, device=p.device) for p in params]
        g = alphaless_gradients(g_n, g_t)
        n_loss = noise_loss([layer.std_for_loss() for _, layer in noise.items()])
        loss = torch.tensor(0.01)
        reps = 5 if args.quick else 30

        def record_seconds(module: Any) -> float:
            def record() -> dict[str, Any]:
                return module._record(
                    0, noise, params, g_n, g_t, g, loss, n_loss, "alphaless", 0.5, 1.0
                )

            return median([timed(record, args.device) for _ in range(reps + 2)][2:])

        result = {"n_hooks": len(params), "record_seconds": record_seconds(train_module)}
        if ref_train is not None:
            result["record_seconds@ref"] = record_seconds(ref_train)
        rec = train_module._record(0, noise, params, g_n, g_t, g, loss, n_loss, "alphaless", 0.5, 1)
        result["record_json_bytes"] = len(json.dumps(rec))
        opt = torch.optim.Adam(noise.param_groups(0.05))
        with tempfile.TemporaryDirectory() as tmp:
            writer = RunWriter(Path(tmp) / "run", {"fit": {}})

            def checkpoint(step: list[int] = [0]) -> None:  # noqa: B006
                step[0] += 1
                writer.append_history([rec])
                writer.checkpoint(
                    step[0],
                    noise.save,
                    {"optimizer": train_module._optimizer_meta(opt), "log_lambda": 0.0},
                    train_module._optimizer_tensors(opt),
                )

            ckpt = [timed(checkpoint, args.device) for _ in range(min(reps, 10) + 1)][1:]
        result["checkpoint_seconds"] = median(ckpt)
    finally:
        noise.remove()
    return result


# ------------------------------------------------------------------------------ memory
def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


class PeakMeter:
    """Peak memory above a baseline: CUDA allocator stats, or RSS high-water on Linux."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            _reset_peak()
            self.base = _status_kb("VmRSS") * 1024

    def stop(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _status_kb("VmHWM") * 1024
        return {"base_mb": self.base / 2**20, "peak_mb": peak / 2**20,
                "delta_mb": (peak - self.base) / 2**20}  # fmt: skip


def memory_worker(args: argparse.Namespace) -> dict[str, Any]:
    """One measurement in this (fresh) process: ``--what fit`` or ``--what fwdbwd``."""
    model = build_model(args)
    tokens = make_tokens(model, 2 * args.batch, args.pos)
    meter = PeakMeter(args.device)
    if args.what == "fwdbwd":
        for p in model.parameters():
            p.requires_grad_(False)
        batch = tokens[: args.batch].to(args.device)
        names = [n for n in model.hook_dict if n.endswith("attn.hook_z")]

        def offset_hook(z: torch.Tensor, hook: Any) -> torch.Tensor:
            delta = torch.zeros((), device=z.device, dtype=z.dtype, requires_grad=True)
            deltas.append(delta)
            return z + delta

        def step() -> None:
            deltas.clear()
            logits = model.run_with_hooks(batch, fwd_hooks=[(n, offset_hook) for n in names])
            vocab = logits.shape[-1]
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(),
                                   batch[:, 1:].reshape(-1))  # fmt: skip
            del logits
            torch.autograd.grad(loss, deltas)

        deltas: list[torch.Tensor] = []
        step()
        meter.start()
        step()
        return meter.stop()
    noise = attach(model, tokens)
    marks: dict[str, Any] = {}

    def on_iter(i: int) -> None:
        if i == 1:
            meter.start()
        elif i == 2:
            marks.update(meter.stop())

    rss_before = None if meter.cuda else _status_kb("VmRSS") / 1024
    clock = StepClock(args.device, on_iter)
    with clocked(clock):
        train_module.fit(model, noise, tokens, steps=3, batch_size=args.batch, quiet=True,
                         log_every=10**9)  # fmt: skip
    if rss_before is not None:
        marks["rss_before_fit_mb"] = rss_before
    return marks


def run_memory_worker(args: argparse.Namespace, what: str) -> dict[str, Any]:
    if args.device.startswith("cuda"):  # allocator stats are per process already
        sub = argparse.Namespace(**{**vars(args), "what": what})
        return memory_worker(sub)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "mem.json"
        cmd = [sys.executable, __file__, "--worker", "mem", "--what", what, "--out", str(out),
               "--model", args.model, "--device", args.device, "--dtype", args.dtype,
               "--threads", str(args.threads), "--batch", str(args.batch),
               "--pos", str(args.pos)]  # fmt: skip
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"memory worker {what} failed:\n{proc.stderr[-2000:]}")
        return json.loads(out.read_text())


def section_memory(args: argparse.Namespace) -> dict[str, Any]:
    if not args.device.startswith("cuda") and not Path("/proc/self/clear_refs").exists():
        return {"skipped": "needs Linux /proc (peak RSS reset) or CUDA"}
    fit = run_memory_worker(args, "fit")
    base = run_memory_worker(args, "fwdbwd")
    return {
        "method": "torch.cuda.max_memory_allocated" if args.device.startswith("cuda")
        else "subprocess, MALLOC_MMAP_THRESHOLD_=65536, VmHWM after clear_refs, minus VmRSS",
        "fit_step": fit,
        "forward_backward": base,
        "ratio_delta": fit["delta_mb"] / base["delta_mb"],
        "ratio_absolute": fit["peak_mb"] / base["peak_mb"],
    }  # fmt: skip


# ----------------------------------------------------------------------------- scaling
def _slope(xs: list[float], ys: list[float]) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else math.nan


def section_scaling(args: argparse.Namespace, model: Any, tokens: torch.Tensor) -> dict[str, Any]:
    n_layers = int(model.cfg.n_layers)
    batch = tokens[: args.batch].to(args.device)
    z_names = [f"blocks.{i}.attn.hook_z" for i in range(n_layers)]
    wanted = {1, n_layers} if args.quick else {1, 2, 4, 8, n_layers}
    counts = sorted(k for k in wanted if 1 <= k <= n_layers)
    configs: dict[str, Any] = {f"{k} hook_z": z_names[:k] for k in counts}
    configs["many"] = list(MANY_HOOKS)
    noises = {name: attach(model, tokens, hooks) for name, hooks in configs.items()}
    points = {name: len(noise.hook_names) for name, noise in noises.items()}
    for noise in noises.values():
        noise.remove()

    def measure(name: str) -> Callable[[], list[float]]:
        def run() -> list[float]:
            noise = noises[name].attach()
            try:
                fwd = noised_forward(model, batch, args.device)
                return [fwd, *fit_steps(model, noise, tokens[: args.batch], args, steps=3)]
            finally:
                noise.remove()

        return run

    variants = {name: measure(name) for name in configs}
    raw = {k: [x for r in v for x in r] for k, v in rounds(variants, args.rounds, ()).items()}
    with torch.no_grad():
        plain = median([timed(lambda: model(batch), args.device) for _ in range(args.rounds)])
    hooks = {}
    for name, samples in raw.items():
        fwd, steps = samples[0::2], samples[1::2]
        hooks[name] = {"points": points[name], "noised_forward": median(fwd),
                       "fit_step": median(steps)}  # fmt: skip
    z_rows = [hooks[f"{k} hook_z"] for k in counts]
    per_hook_z = _slope([r["points"] for r in z_rows], [r["fit_step"] for r in z_rows])
    first, many = hooks[f"{counts[0]} hook_z"], hooks["many"]
    per_hook_many = (many["fit_step"] - first["fit_step"]) / (many["points"] - first["points"])
    fwd_per_hook = (many["noised_forward"] - plain) / many["points"]
    layers = scaling_layers(args) if not args.quick or n_layers <= 4 else {}
    return {
        "plain_forward": plain,
        "hooks": hooks,
        "extra_hook_point_step_seconds (hook_z slope)": per_hook_z,
        "extra_hook_point_step_seconds (many hooks, mean)": per_hook_many,
        "extra_hook_point_forward_seconds (many hooks, mean)": fwd_per_hook,
        "layers": layers,
    }


def scaling_layers(args: argparse.Namespace) -> dict[str, Any]:
    full = MODELS[args.model]["n_layers"]
    wanted = {1, 2, full} if args.quick else {1, 2, 4, 8, full}
    counts = sorted(k for k in wanted if 1 <= k <= full)
    out: dict[str, Any] = {}
    for n in counts:
        model = build_model(args, n_layers=n)
        tokens = make_tokens(model, 2 * args.batch, args.pos)
        batch = tokens[: args.batch].to(args.device)
        noise = attach(model, tokens)
        variants = {
            "plain_forward": lambda m=model, z=noise, b=batch: plain_forward(m, z, b, args.device),
            "fit_step": lambda m=model, z=noise, t=tokens: fit_steps(m, z, t, args, steps=3),
        }
        med = medians(rounds(variants, max(1, args.rounds - 1)))
        noise.remove()
        out[str(n)] = {**med, "fit_step/plain_forward": med["fit_step"] / med["plain_forward"]}
        del model, noise
    xs = [int(k) for k in out]
    out["step_seconds_per_layer"] = _slope(xs, [v["fit_step"] for v in out.values()])
    return out


# --------------------------------------------------------------------------------- tl3
def tl3_worker(args: argparse.Namespace) -> dict[str, Any]:
    model = build_model(args)
    tokens = make_tokens(model, 2 * args.batch, args.pos)
    batch = tokens[: args.batch].to(args.device)
    noise = attach(model, tokens)
    variants = {
        "plain_forward": lambda: plain_forward(model, noise, batch, args.device),
        "noised_forward": lambda: noised_forward(model, batch, args.device),
        "fit_step": lambda: fit_steps(model, noise, tokens, args),
    }
    med = medians(rounds(variants, args.rounds))
    from importlib.metadata import version

    return {**med, "transformer_lens": version("transformer-lens"), "model": type(model).__name__}


def section_tl3(args: argparse.Namespace, tl4: dict[str, float]) -> dict[str, Any]:
    if not TL3_PYTHON.exists():
        return {"skipped": f"{TL3_PYTHON} not found"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "tl3.json"
        cmd = [str(TL3_PYTHON), "-W", "ignore::DeprecationWarning", __file__, "--worker", "tl3",
               "--out", str(out), "--model", args.model, "--device", args.device,
               "--dtype", args.dtype, "--threads", str(args.threads), "--batch", str(args.batch),
               "--pos", str(args.pos), "--rounds", str(args.rounds)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, cwd=ROOT)
        if proc.returncode != 0:
            return {"skipped": f"the 3.x worker failed: {proc.stderr[-1500:]}"}
        tl3 = json.loads(out.read_text())
    keys = ("plain_forward", "noised_forward", "fit_step")
    return {
        "tl3": tl3,
        "tl4": {k: tl4[k] for k in keys},
        "ratios": {f"tl4/tl3 {k}": tl4[k] / tl3[k] for k in keys},
        "tl3 fit_step/plain_forward": tl3["fit_step"] / tl3["plain_forward"],
        "tl3 noised_forward/plain_forward": tl3["noised_forward"] / tl3["plain_forward"],
        "note": "3.x measured in a subprocess right after the 4.x rounds (not interleaved)",
    }


# ------------------------------------------------------------------------ time to answer
def section_answer(args: argparse.Namespace) -> dict[str, Any]:
    from tl_noise.evaluation import ground_truth_mask, roc_auc
    from tl_noise.evaluation.baselines import (
        activation_patching_scores,
        attribution_patching_scores,
    )
    from tl_noise.tasks.induction import induction_task

    try:
        model = tn.load_embedded_model(device=args.device)
    except (FileNotFoundError, OSError, ValueError) as err:
        return {"skipped": f"embedded model not available ({err})"}
    cfg = model.cfg
    n_layers, n_heads = int(cfg.n_layers), int(cfg.n_heads)
    truth = ground_truth_mask(model.ground_truth, n_layers, n_heads)
    k, window = int(truth.sum()), 5 if args.quick else 20
    seq_len = min(int(cfg.n_ctx), 48)
    task = induction_task(int(cfg.d_vocab), n=64 if args.quick else 256, seq_len=seq_len,
                          min_period=3, max_period=(seq_len - 1) // 2, seed=0, bos=0)  # fmt: skip
    start = time.perf_counter()
    noise = tn.attach_noise(model, HOOKS, granularity="head", calibration_tokens=task.tokens)
    clock = StepClock(args.device)
    try:
        with clocked(clock):
            result = train_module.fit(model, noise, task, steps=args.answer_steps, batch_size=32,
                                      lr=0.05, quiet=True, log_every=1)  # fmt: skip
    finally:
        noise.remove()
    names = [f"blocks.{i}.attn.hook_z" for i in range(n_layers)]
    tops: list[frozenset[int] | None] = []
    for record in result.history:
        imp = -torch.tensor([record["std"][n] for n in names]).log().reshape(-1)
        values, order = torch.sort(imp, descending=True)
        # the top-k set counts only when it is well defined (no tie across the k-th place)
        defined = k >= len(values) or bool(values[k - 1] > values[k])
        tops.append(frozenset(order[:k].tolist()) if defined else None)
    stable = next((t for t in range(window - 1, len(tops)) if tops[t] is not None
                   and len(set(tops[t - window + 1 : t + 1])) == 1), None)  # fmt: skip
    final_imp = result.importance
    out: dict[str, Any] = {
        "model": getattr(model, "tl_noise_name", "embedded"),
        "task": {"n": len(task), "seq_len": seq_len},
        "k": k,
        "window": window,
        "steps": args.answer_steps,
        "fit_seconds_total": clock.stamps[-1] - start,
        "tl_noise_auc": roc_auc(final_imp, truth),
    }
    if stable is None:
        out["time_to_answer"] = None
        out["note"] = f"the top-{k} set never stayed fixed for {window} steps"
    else:
        # stamps[t + 1] is the end of step t; time counted from attach_noise (calibration, cache)
        out["time_to_answer"] = clock.stamps[stable + 1] - start
        out["answer_step"] = stable
        found = torch.zeros(n_layers * n_heads, dtype=torch.bool)
        found[list(tops[stable])] = True
        out["answer_precision_at_k"] = float((found & truth.reshape(-1)).sum()) / k
        out["answer_equals_final_top_k"] = tops[stable] == tops[-1]
    for label, fn in (("activation_patching", activation_patching_scores),
                      ("attribution_patching", attribution_patching_scores)):  # fmt: skip
        scores = fn(model, task, batch_size=32)
        out[label] = {"seconds": scores.seconds, "auc": roc_auc(scores.scores, truth)}
    return out


# ------------------------------------------------------------------------------ report
def ratio_table(report: dict[str, Any]) -> str:
    lines = [f"{'ratio':<48}{'value':>9}{'target':>9}  met"]
    for key in RATIO_KEYS:
        value = report["ratios"].get(key)
        target = TARGETS.get(key)
        shown = "n/a" if value is None else f"{value:.3f}"
        met = report["met"].get(key)
        flag = "" if met is None else ("yes" if met else "NO")
        lines.append(f"{key:<48}{shown:>9}{'' if target is None else f'<= {target}':>9}  {flag}")
    return "\n".join(lines)


def details(report: dict[str, Any]) -> str:
    """The absolute numbers behind the ratios, one block per section that ran."""
    lines = []
    if "compare_ref" in report:
        ref = report["compare_ref"]
        lines.append(f"against revision {ref['ref']}: " + ", ".join(
            f"{k} {v:.3f}" for k, v in ref.items() if k != "ref"))  # fmt: skip
    for label, costs in report.get("logging", {}).items():
        old = costs.get("record_seconds@ref")
        lines.append(
            f"logging ({label}, {costs['n_hooks']} hooks): history record "
            f"{costs['record_seconds'] * 1e3:.2f} ms"
            + (f" (ref {old * 1e3:.2f} ms)" if old is not None else "")
            + f", {costs['record_json_bytes']} bytes; checkpoint "
            f"{costs['checkpoint_seconds'] * 1e3:.1f} ms (every 50 steps by default)"
        )
    mem = report.get("memory", {})
    if "fit_step" in mem:
        f, b = mem["fit_step"], mem["forward_backward"]
        lines.append(
            f"memory: fit step +{f['delta_mb']:.0f} MiB (peak {f['peak_mb']:.0f}), "
            f"forward+backward +{b['delta_mb']:.0f} MiB (peak {b['peak_mb']:.0f}); "
            f"{mem['method']}"
        )
    sc = report.get("scaling", {})
    if sc:
        lines.append(f"scaling (plain forward {sc['plain_forward'] * 1e3:.0f} ms):")
        for name, row in sc["hooks"].items():
            lines.append(
                f"  {name:<10} {row['points']:>3} points: noised forward "
                f"{row['noised_forward'] * 1e3:8.1f} ms, fit step {row['fit_step'] * 1e3:8.1f} ms"
            )
        for key in ("extra_hook_point_step_seconds (hook_z slope)",
                    "extra_hook_point_step_seconds (many hooks, mean)",
                    "extra_hook_point_forward_seconds (many hooks, mean)"):  # fmt: skip
            lines.append(f"  {key.replace('_seconds', '')}: {sc[key] * 1e3:.2f} ms")
        for n, row in sc.get("layers", {}).items():
            if isinstance(row, dict):
                lines.append(
                    f"  {n:>2} layers: plain forward {row['plain_forward'] * 1e3:8.1f} ms, "
                    f"fit step {row['fit_step'] * 1e3:8.1f} ms "
                    f"({row['fit_step/plain_forward']:.2f}x)"
                )
    tl3 = report.get("tl3", {})
    if "tl3" in tl3:
        lines.append(
            f"TransformerLens {tl3['tl3']['transformer_lens']} ({tl3['tl3']['model']}): "
            + ", ".join(f"{k} {tl3['tl3'][k] * 1e3:.0f} ms" for k in tl3["tl4"])
        )
    ans = report.get("answer", {})
    if "k" in ans:
        when = ans.get("time_to_answer")
        lines.append(
            f"time to answer ({ans['model']}, top-{ans['k']} stable {ans['window']} steps): "
            + ("never" if when is None else f"{when:.2f} s at step {ans['answer_step']}")
            + f" (fit of {ans['steps']} steps {ans['fit_seconds_total']:.2f} s, AUC "
            f"{ans['tl_noise_auc']:.3f}); activation patching "
            f"{ans['activation_patching']['seconds']:.2f} s (AUC "
            f"{ans['activation_patching']['auc']:.3f}), attribution patching "
            f"{ans['attribution_patching']['seconds']:.2f} s (AUC "
            f"{ans['attribution_patching']['auc']:.3f})"
        )
    return "\n".join(lines)


def seconds_table(seconds: dict[str, float]) -> str:
    return "\n".join(f"  {k:<28}{v * 1e3:>10.1f} ms" for k, v in seconds.items())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.worker:
        result = memory_worker(args) if args.worker == "mem" else tl3_worker(args)
        args.out.write_text(json.dumps(result))
        return result
    from importlib.metadata import version

    report: dict[str, Any] = {
        "config": {k: v for k, v in vars(args).items() if k not in ("worker", "what", "out")},
        "model_config": MODELS[args.model],
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "transformer_lens": version("transformer-lens"),
            "threads": torch.get_num_threads(),
        },  # fmt: skip
        "targets": TARGETS,
        "ratios": dict.fromkeys(RATIO_KEYS),
        "notes": {},
    }
    report["config"]["json"] = str(args.json) if args.json else None
    ratios = report["ratios"]
    sections = set(args.sections)
    began = time.perf_counter()
    shared: dict[str, Any] = {}
    if "ratios" in sections or "tl3" in sections:
        print(
            f"[ratios] {args.model} batch {args.batch}x{args.pos}, {args.rounds} rounds", flush=True
        )
        ratios.update(section_ratios(args, shared))
        report["seconds"] = shared["seconds"]
        report["samples"] = shared["samples"]
        report["ratio_of_medians"] = shared["ratio_of_medians"]
        if "compare_ref" in shared:
            report["compare_ref"] = shared["compare_ref"]
        tokens = args.batch * args.pos
        report["tokens_per_second"] = {
            key: tokens / shared["seconds"][key]
            for key in ("plain_forward", "noised_forward", "fit_step")
            if shared["seconds"].get(key)
        }
        print(seconds_table(shared["seconds"]), flush=True)
        rates = ", ".join(f"{k} {v:.0f}" for k, v in report["tokens_per_second"].items())
        print(f"tokens per second: {rates}", flush=True)
    else:
        report["notes"]["ratios"] = "section not run"
    model = shared.get("model")
    tokens = shared.get("tokens")
    if model is None and ({"logging", "scaling"} & sections):
        model = build_model(args)
        tokens = make_tokens(model, 2 * args.batch, args.pos)
    if "logging" in sections:
        print("[logging]", flush=True)
        ref_train = load_ref(args.compare_ref)[0] if args.compare_ref else None
        report["logging"] = section_logging(args, model, tokens, ref_train)
        if report.get("seconds"):
            ratios["record/fit_step"] = (
                report["logging"]["hook_z"]["record_seconds"] / report["seconds"]["fit_step"]
            )
    if "memory" in sections:
        print("[memory]", flush=True)
        report["memory"] = section_memory(args)
        if "ratio_delta" in report["memory"]:
            ratios["fit_peak_memory/forward_backward_peak_memory"] = report["memory"]["ratio_delta"]
    if "scaling" in sections:
        print("[scaling]", flush=True)
        report["scaling"] = section_scaling(args, model, tokens)
        sc = report["scaling"]
        ratios["extra_hook_point/plain_forward"] = (
            sc["extra_hook_point_step_seconds (many hooks, mean)"] / sc["plain_forward"]
        )
    del model
    if "tl3" in sections:
        print("[tl3]", flush=True)
        report["tl3"] = section_tl3(args, report["seconds"])
        ratios.update(report["tl3"].get("ratios", {}))
        if "skipped" in report["tl3"]:
            report["notes"]["tl3"] = report["tl3"]["skipped"]
    if "answer" in sections:
        print("[answer]", flush=True)
        report["answer"] = ans = section_answer(args)
        if ans.get("time_to_answer") is not None:
            for label in ("activation_patching", "attribution_patching"):
                ratios[f"time_to_answer/{label}"] = ans["time_to_answer"] / ans[label]["seconds"]
        if "skipped" in ans:
            report["notes"]["answer"] = ans["skipped"]
    report["met"] = {
        k: (None if ratios.get(k) is None else bool(ratios[k] <= t)) for k, t in TARGETS.items()
    }
    report["wall_seconds"] = time.perf_counter() - began
    print(details(report))
    print(ratio_table(report))
    for key, note in report["notes"].items():
        print(f"note ({key}): {note}")
    suffix = "-quick" if args.quick else ""
    path = args.json or RESULTS / f"perf-{args.device.split(':')[0]}-{args.model}{suffix}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(report), indent=2, default=_json_default) + "\n")
    print(f"wrote {path}")
    return report


def _finite(value: Any) -> Any:
    """NaN and infinities as strings: the file stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    return str(value)


if __name__ == "__main__":
    main()
