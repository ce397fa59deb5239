"""Speed and memory of tl-noise: ratios against a plain forward pass, measured side by side.

Usage (from the repository root; ``python benchmarks/perf.py`` is the same)::

    .venv/bin/python -m benchmarks.perf                       # GPT-2-small shape, CPU, 1 thread
    .venv/bin/python -m benchmarks.perf --quick --model tiny  # CI smoke (seconds)
    .venv/bin/python -m benchmarks.perf --device cuda --dtype bf16
    .venv/bin/python -m benchmarks.perf --sections ratios --compare-ref 3c418f5

What is measured (``--model gpt2-small``: 12 layers, d_model 768, 12 heads, vocab 50257, random
weights, built offline; batch 4 x 128; per-head noise on every ``hook_z``), by module:

* :mod:`~benchmarks.perf.sections`: noised forward / plain forward (both without gradients);
  fit step (KL objective, alphaless) / plain forward, beside it the step with the clean targets
  recomputed every batch (``clean_cache_mb=0``) and a naive step (clean forward + noised
  forward + backward, the textbook KL, every step); alphaless step / composite step; tokens per
  second; the cost of one history record and one checkpoint; step time against the number of
  noised hook points (the first k ``hook_z``, then 8 hook points per layer) and the number of
  layers (least-squares slopes).
* :mod:`~benchmarks.perf.memory`: peak memory of a fit step / peak memory of a forward +
  backward with frozen weights reaching the same ``hook_z`` activations through zero offsets.
* :mod:`~benchmarks.perf.workers`: TransformerLens 4.x bridge vs 3.x ``HookedTransformer`` (this
  package run by ``.venv-tl3/bin/python``; ``n/a`` without it), and ``--compare-ref REF`` (a
  ``git worktree`` of REF timed by :mod:`~benchmarks.perf.ref_worker` in fresh processes).
* :mod:`~benchmarks.perf.answer`: time to answer on the embedded induction model against
  activation and attribution patching.

Method (:mod:`~benchmarks.perf.timing`): single operations (forwards, the naive step, a record,
a checkpoint) are timed by ``torch.utils.benchmark.Timer.blocked_autorange`` (median per call;
the accelerator is synchronised). Fit steps are timed inside ``tl_noise.fit`` by a trainer
callback, from ``on_step_start`` to ``on_step_end``: setup (the clean-target cache) is outside
the steps; the first step of every call (first-time allocations) and the steps that write a
history record are dropped. The variants of a measurement run in interleaved rounds (the machine
may be shared); a ratio is the median over rounds of the ratio of the two medians within a
round, so load that drifts between rounds cancels; ``ratio_of_medians`` in the JSON gives the
ratio of the overall medians. Threads: ``--threads`` (default 1), applied to every process.
Results: a table on stdout (:mod:`~benchmarks.perf.report`) and JSON under
``benchmarks/results/`` (``perf-<device>-<model>[-quick].json``).
"""

from benchmarks.perf.cli import main, parse_args
from benchmarks.perf.settings import RATIO_KEYS, RATIO_SECTIONS, TARGETS

__all__ = ["RATIO_KEYS", "RATIO_SECTIONS", "TARGETS", "main", "parse_args"]
