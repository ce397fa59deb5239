"""Noise layers attached to real TransformerLens models (runs under 4.x and 3.x alike)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import count_hooks, logits_of

import tl_noise as tn
from tl_noise.hooks import NoiseHooks, resolve_hook_names

pytestmark = pytest.mark.tl3

HOOK_FAMILIES = {
    # hook pattern -> (granularity -> expected std shape) for the TINY config (4 heads, d_head 8)
    "blocks.*.attn.hook_z": {"head": (4,), "head_feature": (4, 8), "feature": (4, 8), "hook": ()},
    "blocks.*.attn.hook_q": {"head": (4,), "head_feature": (4, 8)},
    "blocks.*.attn.hook_k": {"head": (4,)},
    "blocks.*.attn.hook_v": {"head": (4,), "feature": (4, 8)},
    "blocks.*.hook_resid_pre": {"feature": (32,), "hook": ()},
    "blocks.*.hook_mlp_out": {"feature": (32,)},
    "blocks.*.mlp.hook_post": {"feature": (64,)},
    "blocks.*.hook_attn_out": {"feature": (32,)},
}
CASES = [(p, g, s) for p, gs in HOOK_FAMILIES.items() for g, s in gs.items()]


@pytest.mark.parametrize(("pattern", "granularity", "shape"), CASES)
def test_every_granularity_on_every_hook_family(tiny_model, tokens, pattern, granularity, shape):
    param = tn.CloakStandardDeviationParameterization()
    before = logits_of(tiny_model, tokens)
    noise = tn.attach_noise(
        tiny_model,
        pattern,
        granularity=granularity,
        parameterization=param,
        init_std=0.3,
        form="additive",
    )
    try:
        stds = noise.stds()
        assert list(stds) == [pattern.replace("*", str(i)) for i in range(2)]
        for name, std in stds.items():
            assert tuple(std.shape) == shape
            layer = noise.layer(name)
            # std after attach equals the parameterization of the initial rhos
            torch.testing.assert_close(std, param(layer.rhos.detach()).cpu())
            torch.testing.assert_close(std, torch.full(shape, 0.3), rtol=1e-4, atol=1e-5)
        noised = tiny_model(tokens)
        assert not torch.allclose(noised, before)
        # gradients reach the rhos, and only them
        noised.pow(2).mean().backward()
        for p in noise.parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0
        assert all(p.grad is None for p in tiny_model.parameters())
    finally:
        noise.remove()
    assert torch.equal(logits_of(tiny_model, tokens), before)


def test_per_position_granularity(tiny_model, tokens):
    noise = tn.attach_noise(
        tiny_model,
        "blocks.0.attn.hook_z",
        granularity="head",
        per_position=True,
        calibration_tokens=tokens,
    )
    with noise:
        assert noise.stds()["blocks.0.attn.hook_z"].shape == (tokens.shape[1], 4)
        tiny_model(tokens[:, :5])  # shorter sequences use the first positions
        with pytest.raises(ValueError, match="positions"):
            noise.layer("blocks.0.attn.hook_z").check_activation((1, 40, 4, 8))


def test_removal_is_bit_exact_and_leaves_no_hooks(tiny_model, tokens):
    before = logits_of(tiny_model, tokens)
    n_hooks = count_hooks(tiny_model)
    noise = tn.attach_noise(tiny_model, ["blocks.0.attn.hook_z", "blocks.1.hook_resid_pre"])
    assert count_hooks(tiny_model) == n_hooks + 4  # TransformerLens' list + torch's registry
    noise.remove()
    noise.remove()  # idempotent
    assert count_hooks(tiny_model) == n_hooks
    assert torch.equal(logits_of(tiny_model, tokens), before)


def test_context_manager_removes_on_error(tiny_model, tokens):
    before = logits_of(tiny_model, tokens)
    with pytest.raises(RuntimeError, match="boom"):
        with tn.attach_noise(tiny_model, "blocks.*.attn.hook_z") as noise:
            assert noise.attached
            raise RuntimeError("boom")
    assert not noise.attached
    assert torch.equal(logits_of(tiny_model, tokens), before)


def test_parameters_are_only_noise(tiny_model):
    with tn.attach_noise(tiny_model, "blocks.*.attn.hook_z", granularity="head") as noise:
        ids = {id(p) for p in noise.parameters()}
        assert ids.isdisjoint({id(p) for p in tiny_model.parameters()})
        assert sum(p.numel() for p in noise.parameters()) == 2 * 4


def test_hook_selection_by_pattern_callable_and_errors(tiny_model):
    names = resolve_hook_names(tiny_model, lambda n: n.endswith("attn.hook_z"))
    assert names == ["blocks.0.attn.hook_z", "blocks.1.attn.hook_z"]
    assert resolve_hook_names(tiny_model, "blocks.1.attn.hook_z") == ["blocks.1.attn.hook_z"]
    with pytest.raises(ValueError, match=r"closest: .*blocks\.0\.attn\.hook_z"):
        resolve_hook_names(tiny_model, "blocks.0.attn.hook_zz")
    with pytest.raises(ValueError, match="granularity='head'.*head axis"):
        tn.attach_noise(tiny_model, "blocks.0.hook_resid_pre", granularity="head")
    with pytest.raises(ValueError, match="granularity='diag'"):
        tn.attach_noise(tiny_model, "blocks.0.attn.hook_z", granularity="diag")
    with pytest.raises(TypeError, match="TransformerLens model"):
        tn.attach_noise(torch.nn.Linear(2, 2), "blocks.0.attn.hook_z")


def test_coexists_with_user_hooks_and_run_with_cache(tiny_model, tokens):
    seen = {}

    def user_hook(z, hook):
        seen["z"] = z.detach().clone()

    with tn.attach_noise(tiny_model, "blocks.0.attn.hook_z", init_std=1.0) as noise:
        _, clean_cache = (None, None)
        noise.set_mode("off")
        _, clean_cache = tiny_model.run_with_cache(tokens)
        noise.set_mode("sample")
        _, cache = tiny_model.run_with_cache(tokens)
        tiny_model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_z", user_hook)])
        # the cache and later user hooks see the noised activation, which is what flowed on
        assert not torch.allclose(
            cache["blocks.0.attn.hook_z"], clean_cache["blocks.0.attn.hook_z"]
        )
        assert not torch.allclose(seen["z"], clean_cache["blocks.0.attn.hook_z"])
        # run_with_hooks cleaned up its own hook but kept ours
        assert noise.attached
        assert len(tiny_model.hook_dict["blocks.0.attn.hook_z"].fwd_hooks) == 1


def test_reproducible_noise_and_modes(tiny_model, tokens):
    with tn.attach_noise(
        tiny_model, "blocks.*.attn.hook_z", init_std=0.5, seed=3, form="additive"
    ) as noise:
        a = tiny_model(tokens)
        noise.manual_seed(3)
        b = tiny_model(tokens)
        c = tiny_model(tokens)
        assert torch.equal(a, b) and not torch.equal(b, c)
        noise.eval()
        assert noise.mode == "off"
        assert torch.equal(tiny_model(tokens), clean_logits_without(tiny_model, tokens, noise))
        noise.set_mode("mean")  # zero learned mean: the clean output
        assert torch.equal(tiny_model(tokens), clean_logits_without(tiny_model, tokens, noise))
        with pytest.raises(ValueError, match="mode='loud'"):
            noise.set_mode("loud")


def clean_logits_without(model, tokens, noise):
    noise.remove()
    try:
        return logits_of(model, tokens)
    finally:
        noise.attach()


def test_relative_noise_uses_natural_scale(tiny_model, tokens):
    with tn.attach_noise(tiny_model, "blocks.0.hook_resid_pre", calibration_tokens=tokens) as n:
        _, cache = tiny_model.run_with_cache(tokens)
    layer = n.layer("blocks.0.hook_resid_pre")
    n.remove()
    _, clean = tiny_model.run_with_cache(tokens)
    expected = clean["blocks.0.hook_resid_pre"].reshape(-1, 32).std(0, unbiased=False)
    torch.testing.assert_close(layer.natural_scale, expected, rtol=1e-4, atol=1e-6)
    with tn.attach_noise(tiny_model, "blocks.0.hook_resid_pre", relative=False) as n:
        assert torch.equal(n.layer("blocks.0.hook_resid_pre").natural_scale, torch.ones(32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_activations(dtype, tokens, make_model):
    model = make_model().to(dtype)
    with tn.attach_noise(model, "blocks.*.attn.hook_z") as noise:
        out = model(tokens)
        assert out.dtype == dtype and torch.isfinite(out.float()).all()
        assert all(p.dtype == torch.float32 for p in noise.parameters())


def test_estimator_rhos(tiny_model, tokens):
    with tn.attach_noise(tiny_model, "blocks.*.attn.hook_z", estimator=True, init_std=0.2) as n:
        out = tiny_model(tokens)
        out.pow(2).mean().backward()
        layer = n.layer("blocks.0.attn.hook_z")
        assert layer.rhos is None and layer.estimator.W_in.grad is not None
        assert n.stds()["blocks.0.attn.hook_z"].shape == (4,)
        groups = n.param_groups(lr=0.1)
        lrs = {g["name"]: g["lr"] for g in groups}
        # muP with Adam: output-layer weight lr scales as 1/fan_in (d_hidden = 32)
        assert lrs["blocks.0.attn.hook_z.estimator.W_out"] == pytest.approx(0.1 / 32)
        assert lrs["blocks.0.attn.hook_z.estimator.W_in"] == pytest.approx(0.1)


def test_kronecker_covariance_layer(tiny_model, tokens):
    with tn.attach_noise(
        tiny_model, "blocks.0.attn.hook_z", covariance=lambda: tn.KroneckerCovariance(2, 3)
    ) as n:
        tiny_model(tokens).sum().backward()
        cov = n.layer("blocks.0.attn.hook_z").covariance
        assert cov.rank == 6 and all(p.grad is not None for p in cov.parameters())


def test_save_load_roundtrip(tiny_model, tokens, tmp_path):
    with tn.attach_noise(
        tiny_model,
        ["blocks.*.attn.hook_z", "blocks.1.hook_mlp_out"],
        calibration_tokens=tokens,
        seed=5,
    ) as noise:
        with torch.no_grad():
            for p in noise.parameters():
                p.add_(torch.randn_like(p))
        noise.save(tmp_path / "n")
        stds = noise.stds()
        noise.manual_seed(5)
        expected = tiny_model(tokens)
    config = json.loads((tmp_path / "n" / "noise_config.json").read_text())
    assert config["hooks"]["blocks.0.attn.hook_z"]["granularity"] == "head"
    loaded = NoiseHooks.load(tmp_path / "n", tiny_model)
    try:
        for name, std in loaded.stds().items():
            assert torch.equal(std, stds[name])
        assert torch.equal(tiny_model(tokens), expected)
    finally:
        loaded.remove()


def test_load_onto_incompatible_model_is_clear(tiny_model, tmp_path, make_model):
    with tn.attach_noise(tiny_model, "blocks.*.attn.hook_z") as noise:
        noise.save(tmp_path / "n")
    other = make_model(n_heads=2, d_head=16)
    with pytest.raises(ValueError, match="n_heads: saved 4 vs model 2"):
        NoiseHooks.load(tmp_path / "n", other)
    (tmp_path / "n" / "noise_state.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match="truncated or corrupt|checksum"):
        NoiseHooks.load(tmp_path / "n", tiny_model)


def test_attach_to_two_models(tokens, make_model):
    a, b = make_model(), make_model()
    with tn.attach_noise(a, "blocks.*.attn.hook_z") as na, tn.attach_noise(b, "blocks.0.attn.*"):
        assert na.model is a
        a(tokens), b(tokens)


def test_head_importance(tiny_model):
    with tn.attach_noise(tiny_model, "blocks.*.attn.hook_z", granularity="head") as noise:
        with torch.no_grad():
            noise.layer("blocks.1.attn.hook_z").rhos[2] = -6.0
        imp = tn.head_importance(noise)
    assert imp.shape == (2, 4)
    assert imp.argmax() == 1 * 4 + 2
    torch.testing.assert_close(imp[0, 0], -torch.log(torch.tensor(0.05)), rtol=1e-4, atol=1e-4)


def test_pretrained_checkpoint_loads_offline(gpt2_checkpoint, tokens):
    model = tn.load_model(gpt2_checkpoint)
    toks = model.to_tokens("When Mary and John went to the store , John gave a drink to")
    assert toks.shape[0] == 1
    with tn.attach_noise(model, "blocks.*.attn.hook_z", granularity="head") as noise:
        out = model(toks)
        assert out.shape[-1] == model.cfg.d_vocab
        assert set(noise.stds()) == {"blocks.0.attn.hook_z", "blocks.1.attn.hook_z"}
