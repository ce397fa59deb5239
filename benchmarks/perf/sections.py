"""The measured sections run in the benchmark process: the step ratios, logging costs and the
scaling with hook points and depth."""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from benchmarks.perf.settings import HOOKS, MANY_HOOKS, MODELS, PAIRS
from benchmarks.perf.timing import (
    fit_steps,
    median,
    medians,
    paired_ratio,
    rounds,
    slope,
    time_op,
)
from benchmarks.perf.workload import (
    attach,
    build_model,
    make_tokens,
    naive_step_fn,
    noised_forward,
    plain_forward,
)
from tl_noise.fitting.checkpoint import optimizer_meta, optimizer_tensors
from tl_noise.fitting.combiners import make_combiner
from tl_noise.fitting.objectives import noise_loss
from tl_noise.fitting.records import make_record
from tl_noise.runs import RunWriter


def section_ratios(args: argparse.Namespace, model: Any, tokens: torch.Tensor) -> dict[str, Any]:
    """Plain and noised forward, the fit step (alphaless, composite, uncached clean targets) and
    the naive step, in interleaved rounds; ratios paired within rounds."""
    batch = tokens[: args.batch].to(args.device)
    noise = attach(model, tokens)
    opt = torch.optim.Adam(noise.param_groups(0.05))
    naive = naive_step_fn(model, noise, batch, opt)
    dev, b = args.device, args.batch
    variants: dict[str, Callable[[], list[float] | float]] = {
        "plain_forward": lambda: plain_forward(model, noise, batch, args),
        "noised_forward": lambda: noised_forward(model, batch, args),
        "fit_step": lambda: fit_steps(model, noise, tokens, dev, b),
        "composite_step": lambda: fit_steps(model, noise, tokens, dev, b, mode="composite"),
        "fit_step_uncached": lambda: fit_steps(model, noise, tokens, dev, b, clean_cache_mb=0),
        "naive_step": lambda: time_op(naive, args.threads, args.min_run_time),
    }
    try:
        samples = rounds(variants, args.rounds)
    finally:
        noise.remove()
    med = medians(samples)
    return {
        "seconds": med,
        "samples": samples,
        "ratios": {key: paired_ratio(samples, a, c) for key, (a, c) in PAIRS.items()},
        "ratio_of_medians": {key: med[a] / med[c] for key, (a, c) in PAIRS.items()},
    }


def section_logging(args: argparse.Namespace, model: Any, tokens: torch.Tensor) -> dict[str, Any]:
    """Seconds of one history record and of one checkpoint, for per-head noise on every
    ``hook_z`` and for the many-hook-points configuration."""
    return {
        label: _logging_costs(args, model, tokens, hooks)
        for label, hooks in (("hook_z", HOOKS), ("many", list(MANY_HOOKS)))
    }


def _logging_costs(
    args: argparse.Namespace, model: Any, tokens: torch.Tensor, hooks: Any
) -> dict[str, Any]:
    noise = attach(model, tokens, hooks)
    try:
        params = [p for p in noise.parameters() if p.requires_grad]
        gen = torch.Generator(device=params[0].device).manual_seed(0)
        g_n, g_t = (
            [torch.randn(p.shape, generator=gen, device=p.device) for p in params] for _ in range(2)
        )
        combiner = make_combiner("alphaless", 0.5, None, 0.05)
        grads = (g_n, g_t, combiner.combine(g_n, g_t, 0.01))
        n_loss = noise_loss([layer.std_for_loss() for _, layer in noise.items()])

        def record() -> dict[str, Any]:
            return make_record(0, noise, params, grads, (0.01, n_loss), combiner, 1.0)

        rec = record()
        opt = torch.optim.Adam(noise.param_groups(0.05))
        for p, g in zip(params, grads[2], strict=True):  # one step: the moments exist
            p.grad = g
        opt.step()
        opt.zero_grad(set_to_none=True)
        with tempfile.TemporaryDirectory() as tmp:
            writer = RunWriter(Path(tmp) / "run", {"fit": {}})
            step = [0]

            def checkpoint() -> None:
                step[0] += 1
                writer.append_history([rec])
                state = {"optimizer": optimizer_meta(opt), **combiner.state()}
                writer.checkpoint(step[0], noise.save, state, optimizer_tensors(opt))

            ckpt = time_op(checkpoint, args.threads, args.min_run_time)
        return {
            "n_hooks": len(params),
            "record_seconds": time_op(record, args.threads, args.min_run_time),
            "record_json_bytes": len(json.dumps(rec)),
            "checkpoint_seconds": ckpt,
            "checkpoint_tensors": len(optimizer_tensors(opt)),
        }
    finally:
        noise.remove()


def section_scaling(args: argparse.Namespace, model: Any, tokens: torch.Tensor) -> dict[str, Any]:
    """Noised forward and fit step against the number of noised hook points (the first k
    ``hook_z``, then 8 hook points per layer), and against the number of layers."""
    n_layers = int(model.cfg.n_layers)
    batch = tokens[: args.batch].to(args.device)
    z_names = [f"blocks.{i}.attn.hook_z" for i in range(n_layers)]
    counts = sorted(
        k for k in ({1, n_layers} if args.quick else {1, 2, 4, 8, n_layers}) if 1 <= k <= n_layers
    )
    configs: dict[str, Any] = {f"{k} hook_z": z_names[:k] for k in counts}
    configs["many"] = list(MANY_HOOKS)
    noises: dict[str, Any] = {}
    for name, hooks in configs.items():  # one attached at a time: a hook point takes one noise
        noises[name] = attach(model, tokens, hooks)
        noises[name].remove()

    def measure(name: str) -> Callable[[], list[float]]:
        def run() -> list[float]:
            noise = noises[name].attach()
            try:
                fwd = noised_forward(model, batch, args)
                steps = fit_steps(model, noise, tokens[: args.batch], args.device, args.batch, 3)
                return [fwd, median(steps)]
            finally:
                noise.remove()

        return run

    samples = rounds({name: measure(name) for name in configs}, args.rounds)
    with torch.no_grad():
        plain = time_op(lambda: model(batch), args.threads, args.min_run_time)
    hooks = {
        name: {
            "points": len(noises[name].hook_names),
            "noised_forward": median([r[0] for r in per_round]),
            "fit_step": median([r[1] for r in per_round]),
        }
        for name, per_round in samples.items()
    }
    z_rows = [hooks[f"{k} hook_z"] for k in counts]
    first, many = z_rows[0], hooks["many"]
    return {
        "plain_forward": plain,
        "hooks": hooks,
        "extra_hook_point_step_seconds (hook_z slope)": slope(
            [r["points"] for r in z_rows], [r["fit_step"] for r in z_rows]
        ),
        "extra_hook_point_step_seconds (many hooks, mean)": (
            (many["fit_step"] - first["fit_step"]) / (many["points"] - first["points"])
        ),
        "extra_hook_point_forward_seconds (many hooks, mean)": (
            (many["noised_forward"] - plain) / many["points"]
        ),
        "layers": scaling_layers(args) if not args.quick or n_layers <= 4 else {},
    }


def scaling_layers(args: argparse.Namespace) -> dict[str, Any]:
    """Plain forward and fit step of the model cut to 1, 2, 4, 8 ... layers; the per-layer
    slopes of both."""
    full = int(MODELS[args.model]["n_layers"])
    wanted = {1, 2, full} if args.quick else {1, 2, 4, 8, full}
    out: dict[str, Any] = {}
    for n in sorted(k for k in wanted if 1 <= k <= full):
        model = build_model(args, n_layers=n)
        tokens = make_tokens(model, 2 * args.batch, args.pos)
        batch = tokens[: args.batch].to(args.device)
        noise = attach(model, tokens)
        variants: dict[str, Callable[[], list[float] | float]] = {
            "plain_forward": partial(plain_forward, model, noise, batch, args),
            "fit_step": partial(fit_steps, model, noise, tokens, args.device, args.batch, 3),
        }
        med = medians(rounds(variants, max(1, args.rounds - 1)))
        noise.remove()
        out[str(n)] = {**med, "fit_step/plain_forward": med["fit_step"] / med["plain_forward"]}
    xs = [float(k) for k in out]
    per_step = slope(xs, [v["fit_step"] for v in out.values()])
    per_fwd = slope(xs, [v["plain_forward"] for v in out.values()])
    out["step_seconds_per_layer"] = per_step
    out["forward_seconds_per_layer"] = per_fwd
    out["fit_step/plain_forward per layer"] = per_step / per_fwd
    return out
