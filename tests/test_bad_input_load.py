"""Bad input to ``NoiseHooks.load``: damaged saved noise, incompatible models.

Loading fails with the file and the reason named; the saved files stay byte-identical and the
model has no hooks left (contract and fixtures: ``tests/conftest.py``).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil

import pytest
import torch
from conftest import (
    CONFIG,
    STATE,
    assert_model_intact,
    logits_of,
    snapshot,
    truncate,
)

from tl_noise.hooks import NoiseHooks
from tl_noise.io import read_tensors, tensor_bytes

pytestmark = pytest.mark.tl3


# ------------------------------------------------------------------ loading saved noise
def _edit_config(edit):
    def apply(path):
        file = path / "noise_config.json"
        config = json.loads(file.read_text())
        edit(config)
        file.write_text(json.dumps(config))

    return apply


def _rename_hook(config):
    config["order"][0] = "blocks.0.attn.hook_zz"
    config["hooks"]["blocks.0.attn.hook_zz"] = config["hooks"].pop("blocks.0.attn.hook_z")


def _edit_state(edit):
    """Rewrite the state with ``edit(tensors)`` applied and its checksum updated (a file that
    passes the checksum but holds tensors no fit writes)."""

    def apply(path):
        tensors = {k: v.clone() for k, v in read_tensors(path / STATE).items()}
        edit(tensors)
        data = tensor_bytes(tensors)
        (path / STATE).write_bytes(data)
        _edit_config(lambda c: c.update(state_sha256=hashlib.sha256(data).hexdigest()))(path)

    return apply


RHOS = "layers.blocks__0__attn__hook_z.rhos"


def _nan_rho(tensors):
    tensors[RHOS][1] = float("nan")


def _inf_rho(tensors):
    tensors[RHOS][0] = float("inf")


def _integer_rhos(tensors):
    tensors[RHOS] = tensors[RHOS].round().long()


def _flip_last_byte(path):
    file = path / "noise_state.safetensors"
    data = bytearray(file.read_bytes())
    data[-1] ^= 0x55  # inside the tensor data: a valid file whose checksum no longer matches
    file.write_bytes(bytes(data))


LOAD_CASES = {
    "truncated-state": (truncate(STATE), r"noise_state.safetensors' is truncated or corrupt"),
    "empty-state": (truncate(STATE, 0), r"noise_state.safetensors' is truncated or corrupt"),
    "corrupted-state": (_flip_last_byte, r"noise_state.safetensors' does not match .*checksum"),
    "missing-state": (lambda p: (p / STATE).unlink(), "noise_state.safetensors' does not exist"),
    "missing-config": (lambda p: (p / CONFIG).unlink(), "noise_config.json' does not exist"),
    "truncated-config": (truncate(CONFIG), "noise_config.json' is not valid JSON"),
    "binary-config": (
        lambda p: (p / CONFIG).write_bytes(b"\xff\xfe\x00"),
        "noise_config.json' is not valid JSON",
    ),
    "config-not-an-object": (
        lambda p: (p / CONFIG).write_text("[1, 2]"),
        "not a tl-noise noise config",
    ),
    "config-without-fingerprint": (
        _edit_config(lambda c: c.pop("fingerprint")),
        "malformed tl-noise noise config: 'fingerprint' is None",
    ),
    "config-hooks-not-a-dict": (
        _edit_config(lambda c: c.update(hooks=["x"])),
        r"'hooks' is \['x'\], expected a JSON object",
    ),
    "config-layer-without-granularity": (
        _edit_config(lambda c: c["hooks"]["blocks.0.attn.hook_z"].pop("granularity")),
        "bad layer settings.*'granularity'",
    ),
    "config-for-a-missing-hook": (_edit_config(_rename_hook), "blocks.0.attn.hook_zz"),
    "nan-in-state": (_edit_state(_nan_rho), f"{RHOS}' in .* holds NaN or inf values"),
    "inf-in-state": (_edit_state(_inf_rho), f"{RHOS}' in .* holds NaN or inf values"),
    "integer-tensor-in-state": (
        _edit_state(_integer_rhos),
        f"{RHOS}' in .* has dtype torch.int64, expected a floating-point dtype",
    ),
    "newer-format-version": (
        _edit_config(lambda c: c.update(version=2)),
        "noise_config.json' has format version 2, newer than the version 1 this tl-noise reads",
    ),
    "checksum-deleted": (
        _edit_config(lambda c: c.pop("state_sha256")),
        "noise_config.json' has no state_sha256",
    ),
    "config-granularity-disagrees-with-state": (
        _edit_config(lambda c: c["hooks"]["blocks.1.attn.hook_z"].update(granularity="feature")),
        re.escape("'layers.blocks__1__attn__hook_z.rhos' has shape [4], expected [4, 8]"),
    ),
}


@pytest.mark.parametrize("case", list(LOAD_CASES))
def test_loading_damaged_noise(case, tiny_model, data, intact, saved_noise, tmp_path):
    damage, match = LOAD_CASES[case]
    path = tmp_path / "noise"
    shutil.copytree(saved_noise, path)
    damage(path)
    before = snapshot(path)
    with pytest.raises(ValueError, match=match):
        NoiseHooks.load(path, tiny_model)
    assert snapshot(path) == before


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"n_heads": 2, "d_head": 16}, "n_heads: saved 4 vs model 2"),
        ({"d_model": 48}, "d_model: saved 32 vs model 48"),
        ({"n_layers": 1}, "n_layers: saved 2 vs model 1"),
        ({"d_vocab": 60}, "d_vocab: saved 50 vs model 60"),
    ],
    ids=["heads", "width", "depth", "vocabulary"],
)
def test_loading_noise_onto_an_incompatible_model(overrides, match, make_model, saved_noise):
    other = make_model(**overrides)
    tokens = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    before_files, before_out = snapshot(saved_noise), logits_of(other, tokens)
    with pytest.raises(ValueError, match=f"{re.escape(str(saved_noise))}.*{match}"):
        NoiseHooks.load(saved_noise, other)
    assert snapshot(saved_noise) == before_files
    assert_model_intact(other, tokens, before_out)


def test_loading_noise_onto_a_plain_module_or_from_nowhere(saved_noise, tmp_path):
    before = snapshot(saved_noise)
    with pytest.raises(TypeError, match="got Linear"):
        NoiseHooks.load(saved_noise, torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=f"{re.escape(str(tmp_path / 'nope'))}.*does not exist"):
        NoiseHooks.load(tmp_path / "nope", torch.nn.Linear(2, 2))
    assert snapshot(saved_noise) == before
