"""Bad input in run directories: a file in the way, resuming with another config, damage.

The fit refuses before it changes anything: the run directory stays byte-identical and the noise
keeps its state (contract and fixtures: ``tests/conftest.py``).
"""

from __future__ import annotations

import re
import shutil

import pytest
from conftest import BAD_INPUT_FIT as FIT
from conftest import (
    HOOKS,
    assert_model_intact,
    assert_same_state,
    attach,
    logits_of,
    noise_state,
    snapshot,
    truncate,
)

import tl_noise as tn
from tl_noise.fitting import fit

pytestmark = pytest.mark.tl3


# -------------------------------------------------------------------------- run directories
def test_run_dir_under_a_regular_file(tiny_model, data, intact, tmp_path):
    tokens, mask = data
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder\n")
    for run_dir in (blocker / "run", blocker):
        with attach(tiny_model, tokens) as noise:
            before = noise_state(noise)
            with pytest.raises(ValueError, match=f"run_dir {re.escape(repr(str(run_dir)))} is not"):
                fit(tiny_model, noise, tokens, loss_mask=mask, steps=2, run_dir=run_dir, **FIT)
            assert_same_state(noise_state(noise), before)
        assert blocker.read_text() == "not a folder\n"


RESUME_CASES = {
    "another-lr": (dict(lr=0.5), None, None, "different config: lr: 0.05 -> 0.5"),
    "another-seed": (dict(seed=4), None, None, "different config: seed: 3 -> 4"),
    "another-batch-size": (dict(batch_size=4), None, None, "batch_size: 8 -> 4"),
    "another-mode": (dict(mode="composite"), None, None, "mode: 'alphaless' -> 'composite'"),
    "another-hook": (
        {},
        dict(hooks=[HOOKS, "blocks.1.hook_mlp_out"]),
        None,
        "different noise: blocks.1.hook_mlp_out: not in the run",
    ),
    "another-granularity": (
        {},
        dict(granularity="head_feature"),
        None,
        "blocks.0.attn.hook_z.granularity: 'head' -> 'head_feature'",
    ),
    "another-model": ({}, None, dict(n_heads=2, d_head=16), "n_heads: saved 4 vs model 2"),
    "another-dataset-size": ("fewer", None, None, "n_examples: 24 -> 20"),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_with_a_different_config(case, tiny_model, data, run_copy, make_model):
    fit_kw, attach_kw, model_kw, match = RESUME_CASES[case]
    tokens, mask = data
    if fit_kw == "fewer":
        fit_kw, tokens, mask = {}, tokens[:20], mask[:20]
    m = make_model(**model_kw) if model_kw else tiny_model
    reference = logits_of(m, tokens)
    before = snapshot(run_copy)
    with tn.attach_noise(
        m, calibration_tokens=tokens, **{"hooks": HOOKS, **(attach_kw or {})}
    ) as n:
        state = noise_state(n)
        with pytest.raises(ValueError, match=match):
            fit(m, n, tokens, loss_mask=mask, steps=8, run_dir=run_copy, resume=True,
                **{**FIT, **fit_kw})  # fmt: skip
        assert_same_state(noise_state(n), state)
    assert snapshot(run_copy) == before
    assert_model_intact(m, tokens, reference)


RUN_DAMAGE = {
    "no-checkpoint": (
        lambda r: shutil.rmtree(r / "checkpoints"),
        "resume=True but .* has no checkpoint yet",
    ),
    "truncated-checkpoint-state": (
        truncate("checkpoints/step_0000004/noise_state.safetensors"),
        "step_0000004/noise_state.safetensors' is truncated or corrupt",
    ),
    "corrupted-optimizer-state": (
        truncate("checkpoints/step_0000004/optimizer_state.safetensors", 0.3),
        "step_0000004/optimizer_state.safetensors' is truncated or corrupt",
    ),
    "missing-trainer-state": (
        lambda r: (r / "checkpoints/step_0000004/trainer_state.json").unlink(),
        "trainer state .*step_0000004/trainer_state.json' does not exist",
    ),
    "malformed-run-config": (
        truncate("config.json"),
        "run config .*config.json' is not valid JSON",
    ),
    "new-run-into-a-finished-one": (None, "already holds a run; pass resume=True"),
}


@pytest.mark.parametrize("case", list(RUN_DAMAGE))
def test_damaged_run_directory(case, tiny_model, data, intact, run_copy):
    damage, match = RUN_DAMAGE[case]
    tokens, mask = data
    if damage:
        damage(run_copy)
    before = snapshot(run_copy)
    with attach(tiny_model, tokens) as noise:
        state = noise_state(noise)
        with pytest.raises(ValueError, match=match):
            fit(tiny_model, noise, tokens, loss_mask=mask, steps=8, run_dir=run_copy,
                resume=damage is not None, **FIT)  # fmt: skip
        assert_same_state(noise_state(noise), state)
    assert snapshot(run_copy) == before
