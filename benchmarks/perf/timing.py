"""Clocks: ``torch.utils.benchmark`` for single operations, a trainer callback for fit steps,
and the interleaved rounds that turn samples into paired ratios."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.benchmark import Timer

import tl_noise as tn
from tl_noise.fitting import Callback

Samples = dict[str, list[list[float]]]  # variant -> one list of seconds per round


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else math.nan


def time_op(fn: Callable[[], Any], threads: int, min_run_time: float) -> float:
    """Median seconds of one call of ``fn`` over blocks of ``Timer.timeit`` (the timer syncs
    the accelerator): one unrecorded call (warm-up, block size), then blocks of about a tenth of
    ``min_run_time`` until ``min_run_time`` is spent, so a stall of the machine spoils one block
    of many; an operation longer than ``min_run_time`` is run once more."""
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    first = timer.timeit(1).median
    number = max(1, int(min_run_time / (10 * max(first, 1e-9))))
    blocks: list[float] = []
    while not blocks or len(blocks) * number * median(blocks) < min_run_time:
        blocks.append(timer.timeit(number).median)
    return median(blocks)


class StepTimer(Callback):
    """Seconds of every fit step, from ``on_step_start`` to ``on_step_end`` (device synced).

    Runs first among the callbacks, so the progress bar and the run directory are not timed.
    ``ends`` holds the ``perf_counter`` stamp at the end of every step.
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.began = 0.0
        self.steps: list[tuple[int, float, bool]] = []  # (step, seconds, wrote a record)
        self.ends: list[float] = []

    def on_step_start(self, trainer: Any, step: int) -> None:
        sync(self.device)
        self.began = time.perf_counter()

    def on_step_end(self, trainer: Any, step: int, record: dict[str, Any] | None) -> None:
        sync(self.device)
        now = time.perf_counter()
        self.steps.append((step, now - self.began, record is not None))
        self.ends.append(now)

    def plain_steps(self) -> list[float]:
        """Seconds of the steps but the first (first-time allocations) and those that wrote a
        history record (timed on their own in the logging section)."""
        return [sec for i, (_, sec, logged) in enumerate(self.steps) if i > 0 and not logged]


def fit_steps(
    model: Any,
    noise: Any,
    tokens: torch.Tensor,
    device: str,
    batch: int,
    steps: int = 4,
    **kwargs: Any,
) -> list[float]:
    """Seconds of the plain steps of one ``tn.fit`` call (setup, e.g. the clean-target cache, is
    outside the steps; with ``log_every`` this large only steps 0 and ``steps - 1`` log). The
    ranking refinement after the last step is switched off: it is no step's cost."""
    clock = StepTimer(device)
    opts = dict(
        steps=steps, batch_size=batch, lr=0.05, quiet=True, log_every=10**9, refine_window=0
    )
    tn.fit(model, noise, tokens, callbacks=[clock], **{**opts, **kwargs})
    return clock.plain_steps()


def rounds(variants: dict[str, Callable[[], list[float] | float]], n_rounds: int) -> Samples:
    """Run every variant once per round, the order rotated each round: samples per variant and
    round. Single operations warm up inside ``time_op``; fit steps drop their first step."""
    names = list(variants)
    samples: Samples = {name: [] for name in names}
    for r in range(n_rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            out = variants[name]()
            samples[name].append(out if isinstance(out, list) else [out])
    return samples


def medians(samples: Samples) -> dict[str, float]:
    return {name: median([x for r in per_round for x in r]) for name, per_round in samples.items()}


def paired_ratio(samples: Samples, a: str, b: str) -> float:
    """Median over rounds of ``median(a) / median(b)`` within the round: the two were measured
    close together, so a load that drifts between rounds cancels."""
    pairs = zip(samples[a], samples[b], strict=True)
    return median([median(x) / median(y) for x, y in pairs])


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ``ys`` against ``xs`` (nan with fewer than two distinct xs)."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else math.nan
