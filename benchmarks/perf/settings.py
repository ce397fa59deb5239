"""What the benchmark measures on: model shapes, hook points, targets, the reported ratios."""

from __future__ import annotations

from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
TL3_PYTHON = ROOT / ".venv-tl3" / "bin" / "python"
HOOKS = "blocks.*.attn.hook_z"
MODELS: dict[str, dict[str, Any]] = {
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
# every ratio of the table, with the section that computes it
RATIO_SECTIONS = {
    "noised_forward/plain_forward": "ratios",
    "fit_step/plain_forward": "ratios",
    "fit_step_uncached/plain_forward": "ratios",
    "naive_step/plain_forward": "ratios",
    "naive_step/fit_step": "ratios",
    "alphaless_step/composite_step": "ratios",
    "fit_peak_memory/forward_backward_peak_memory": "memory",
    "record/fit_step": "logging",
    "checkpoint/fit_step": "logging",
    "extra_hook_point/plain_forward": "scaling",
    "fit_step/plain_forward per layer": "scaling",
    "tl4/tl3 plain_forward": "tl3",
    "tl4/tl3 noised_forward": "tl3",
    "tl4/tl3 fit_step": "tl3",
    "time_to_answer/activation_patching": "answer",
    "time_to_answer/attribution_patching": "answer",
}
RATIO_KEYS = tuple(RATIO_SECTIONS)
# ratios measured within one interleaved round (the pairs behind the "ratios" section)
PAIRS = {
    "noised_forward/plain_forward": ("noised_forward", "plain_forward"),
    "fit_step/plain_forward": ("fit_step", "plain_forward"),
    "fit_step_uncached/plain_forward": ("fit_step_uncached", "plain_forward"),
    "naive_step/plain_forward": ("naive_step", "plain_forward"),
    "naive_step/fit_step": ("naive_step", "fit_step"),
    "alphaless_step/composite_step": ("fit_step", "composite_step"),
}
SECTIONS = ("ratios", "logging", "memory", "scaling", "tl3", "answer")
TOKENS_PER_SECOND = ("plain_forward", "noised_forward", "fit_step")
