"""The trainer's parts: FitConfig, the CLI derived from it, combiners, per-head alpha, callbacks."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tl_noise as tn
from tl_noise.cli.main import build_parser, config_kwargs
from tl_noise.fitting import Callback, FitConfig
from tl_noise.fitting.combiners import COMBINERS, Budget, make_combiner
from tl_noise.fitting.projection import (
    calculate_equivalent_alpha_and_scaling_factor,
    equivalent_alpha_and_scaling_factor_rows,
)

pytestmark = pytest.mark.tl3


def test_fit_config_is_frozen_and_validates():
    config = FitConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.steps = 3  # type: ignore[misc]
    with pytest.raises(ValueError, match="mode='fast'; accepted: alphaless, composite, budget"):
        FitConfig(mode="fast")
    with pytest.raises(tn.TLNoiseError, match="steps=0"):
        FitConfig(steps=0)
    assert FitConfig(mode="composite", alpha=0.3).record(4, 5)["alpha"] == 0.3
    assert FitConfig(alpha=0.3).record(4, 5)["alpha"] is None  # ignored outside composite


def test_every_fit_setting_is_a_cli_option_with_help():
    parser = build_parser()
    names = [name for name, _, _ in FitConfig.settings()]
    args = parser.parse_args(["fit", "somemodel", "--batch-size", "7", "--noise-loss-kind",
                              "neg_mean_log", "--clean-cache-mb", "0"])  # fmt: skip
    kwargs = config_kwargs(args)
    assert list(kwargs) == names
    assert kwargs["batch_size"] == 7 and kwargs["noise_loss_kind"] == "neg_mean_log"
    assert FitConfig(**kwargs).clean_cache_mb == 0
    demo = parser.parse_args(["demo"])
    assert demo.steps == 500 and config_kwargs(demo)["steps"] == 500
    help_text = parser._subparsers._group_actions[0].choices["fit"].format_help()  # type: ignore
    for name in names:
        assert f"--{name.replace('_', '-')}" in help_text
    assert "(default: 500)" in help_text


def test_modes_registry_matches_the_config():
    assert COMBINERS.names() == ("alphaless", "composite", "budget")
    n, t = [torch.tensor([1.0, 0.0])], [torch.tensor([0.0, 3.0])]
    composite = make_combiner("composite", 0.25, None, 0.05)
    assert torch.allclose(composite.combine(n, t, 0.0)[0], torch.tensor([0.25, 2.25]))


def test_budget_state_round_trips_and_steers_lambda():
    budget = Budget(budget=0.1, budget_lr=0.5)
    for _ in range(5):
        budget.update(0.4)  # over budget: lambda grows
    assert budget.multiplier() > 1
    copy = Budget(budget=0.1, budget_lr=0.5)
    copy.load_state(budget.state())
    assert copy.multiplier() == budget.multiplier() and copy.task_ema == budget.task_ema


# per-row inputs are already-reduced norms: the rows form does not rescale tiny magnitudes
COMPONENT = st.floats(-5, 5).filter(lambda x: x == 0 or abs(x) > 1e-6)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(COMPONENT, min_size=3, max_size=3),
    st.lists(COMPONENT, min_size=3, max_size=3),
)
def test_per_row_alpha_equals_the_vector_formula(a, b):
    n, t = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    alpha, scale = calculate_equivalent_alpha_and_scaling_factor(n, t)
    rows = equivalent_alpha_and_scaling_factor_rows(n.norm()[None], t.norm()[None], (n @ t)[None])
    if math.isfinite(float(alpha)) and abs(float(scale)) > 1e-9:
        assert float(rows[1][0]) == pytest.approx(float(scale), rel=1e-9, abs=1e-12)
        assert float(rows[0][0]) == pytest.approx(float(alpha), rel=1e-6, abs=1e-9)


class Recorder(Callback):
    def __init__(self):
        self.events: list[tuple[str, int]] = []

    def on_fit_start(self, trainer):
        self.events.append(("start", trainer.start))

    def on_step_start(self, trainer, step):
        self.events.append(("step", step))

    def on_step_end(self, trainer, step, record):
        self.events.append(("record" if record else "no-record", step))

    def on_fit_end(self, trainer, result):
        self.events.append(("end", len(result.history)))


def test_callbacks_see_every_step(tiny_model):
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, tiny_model.cfg.d_vocab, (6, 8), generator=gen)
    recorder = Recorder()
    with tn.attach_noise(tiny_model, "blocks.*.attn.hook_z", calibration_tokens=tokens) as noise:
        tn.fit(tiny_model, noise, tokens, steps=4, log_every=3, quiet=True, callbacks=[recorder])
    assert recorder.events == [
        ("start", 0), ("step", 0), ("record", 0), ("step", 1), ("no-record", 1),
        ("step", 2), ("no-record", 2), ("step", 3), ("record", 3), ("end", 2),
    ]  # fmt: skip
