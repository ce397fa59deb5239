"""Dead units get no noise; the replacement form; node-level importance and its names."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY, TL_MAJOR, freeze, tiny_data

import tl_noise as tn
from tl_noise.hooks.importance import DEAD_MARGIN, std_node_scores
from tl_noise.models import build_native_model
from tl_noise.noise import DirectStandardDeviationParameterization, NoiseLayer

pytestmark = pytest.mark.tl3


def dead_mlp_model():
    """TINY with layer 0's MLP emptied: W_out = 0, so hook_mlp_out is the constant b_out."""
    model = freeze(build_native_model(TINY))
    # 4.x native: layers.0...mlp...fc_out.weight/bias; 3.x: blocks.0.mlp.W_out/b_out
    out = [(k, p) for k, p in model.named_parameters()
           if k.startswith(("blocks.0.mlp.", "layers.0.")) and ("W_out" in k or "b_out" in k
                                                              or "fc_out" in k)]  # fmt: skip
    assert len(out) == 2, [k for k, _ in out]
    with torch.no_grad():
        for name, param in out:
            param.fill_(0.3 if ("b_out" in name or name.endswith("bias")) else 0.0)
    return model


@pytest.mark.parametrize("form", ["additive", "replacement"])
def test_a_dead_mlp_gets_no_noise_and_ranks_last(form):
    model = dead_mlp_model()
    tokens, mask = tiny_data()
    clean = model(tokens)
    hooks = ["blocks.*.attn.hook_z", "blocks.*.hook_mlp_out"]
    with tn.attach_noise(model, hooks, calibration_tokens=tokens, form=form, init_std=0.5) as noise:
        dead = noise.layer("blocks.0.hook_mlp_out")
        assert torch.equal(dead.natural_scale, torch.zeros_like(dead.natural_scale))
        live = noise.layer("blocks.1.hook_mlp_out")
        assert bool((live.natural_scale > 0).all())
        # with every other layer off, noise on the dead MLP changes nothing, bit for bit
        for name, layer in noise.items():
            layer.mode = "sample" if name == "blocks.0.hook_mlp_out" else "off"
        assert torch.equal(model(tokens), clean)
        noise.set_mode("sample")
        # the noise's own ranking (the in-context refinement judges a random model's heads by
        # whether ablating them helps, which says nothing about the dead MLP)
        tn.fit(model, noise, tokens, loss_mask=mask, steps=40, batch_size=24, quiet=True,
               refine_window=0)  # fmt: skip
        scores = tn.node_importance(noise)
    assert list(scores) == [f"a0.h{h}" for h in range(4)] + ["m0"] + [
        f"a1.h{h}" for h in range(4)
    ] + ["m1"]  # fmt: skip
    assert min(scores, key=scores.get) == "m0"


def test_a_dead_node_scores_below_every_live_one_whatever_its_std():
    """No noise reaches it, so no task gradient reaches its std: whatever value the std takes
    says nothing about the node (on compiled programs such stds outranked live nodes)."""
    model = dead_mlp_model()
    tokens, mask = tiny_data()
    hooks = ["blocks.*.attn.hook_z", "blocks.*.hook_mlp_out"]
    with tn.attach_noise(model, hooks, calibration_tokens=tokens) as noise:
        tn.fit(model, noise, tokens, loss_mask=mask, steps=30, batch_size=24, quiet=True,
               refine_window=0)  # fmt: skip
        scores = std_node_scores(noise)
    live = {n: v for n, v in scores.items() if n != "m0"}
    assert scores["m0"] == min(live.values()) - DEAD_MARGIN


def test_constant_residual_features_get_no_noise():
    model = freeze(build_native_model(TINY))
    tokens, _ = tiny_data()
    with tn.attach_noise(model, "hook_pos_embed", calibration_tokens=tokens[:, :1]) as noise:
        # one position only: the positional embedding is constant over the calibration set
        scale = noise.layer("hook_pos_embed").natural_scale
    assert torch.equal(scale, torch.zeros_like(scale))


def replacement_layer(sigma: float, unit=(3,)):
    param = DirectStandardDeviationParameterization(scale=(0.0, 1.0))
    layer = NoiseLayer(unit, "hook", param, init_std=sigma, form="replacement")
    layer.set_natural_scale(torch.tensor([1.0, 2.0, 0.5]), torch.tensor([0.5, -1.0, 3.0]))
    return layer


def test_replacement_at_sigma_one_is_a_gaussian_resample():
    layer = replacement_layer(1.0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 5, 3, generator=gen) * 10 + 7
    out = layer(x, generator=torch.Generator().manual_seed(1))
    again = layer(torch.zeros_like(x), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(out, again, atol=1e-5)  # no trace of the input is left
    flat = out.reshape(-1, 3)
    assert flat.mean(0).tolist() == pytest.approx([0.5, -1.0, 3.0], abs=0.03)
    assert flat.std(0).tolist() == pytest.approx([1.0, 2.0, 0.5], rel=0.02)
    # the same draw, written out: mu + s * eps
    eps = torch.randn((4000, 5, 3), generator=torch.Generator().manual_seed(1))
    expected = torch.tensor([0.5, -1.0, 3.0]) + torch.tensor([1.0, 2.0, 0.5]) * eps
    assert torch.allclose(out, expected, atol=1e-5)


def test_replacement_interpolates_and_its_mean_mode_is_partial_mean_ablation():
    layer = replacement_layer(0.25)
    x = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(0))
    layer.mode = "mean"
    expected = 0.75 * x + 0.25 * torch.tensor([0.5, -1.0, 3.0])
    assert torch.allclose(layer(x), expected, atol=1e-6)
    layer.mode = "off"
    assert torch.equal(layer(x), x)


def test_replacement_needs_sigma_capped_at_one():
    with pytest.raises(ValueError, match="form='replacement'.*sigma <= 1.*maximum is 2"):
        NoiseLayer((3,), "hook", tn.CloakStandardDeviationParameterization(), form="replacement")
    with pytest.raises(ValueError, match="form='mix'; accepted: additive, replacement"):
        NoiseLayer((3,), "hook", form="mix")
    default = NoiseLayer((3,), "hook", form="replacement")
    assert default.parameterization.scale[1] == pytest.approx(1.0)


def test_replacement_noise_round_trips_and_old_noise_loads_as_additive(tmp_path):
    model = freeze(build_native_model(TINY))
    tokens, _ = tiny_data()
    with tn.attach_noise(model, "blocks.*.attn.hook_z", calibration_tokens=tokens,
                         form="replacement") as noise:  # fmt: skip
        noise.save(tmp_path / "new")
        mean = noise.layer("blocks.0.attn.hook_z").natural_mean.clone()
        out = model(tokens)
    loaded = tn.NoiseHooks.load(tmp_path / "new", model, attach=False)
    assert loaded.layer("blocks.0.attn.hook_z").form == "replacement"
    assert torch.equal(loaded.layer("blocks.0.attn.hook_z").natural_mean, mean)
    with loaded:
        assert torch.allclose(model(tokens), out)
    # noise written before forms existed has no "form" and no natural_mean: additive
    with tn.attach_noise(model, "blocks.*.attn.hook_z", calibration_tokens=tokens,
                         form="additive") as noise:  # fmt: skip
        noise.save(tmp_path / "old")
    config = json.loads((tmp_path / "old" / "noise_config.json").read_text())
    for layer in config["hooks"].values():
        del layer["form"]
    del config["node_scores"], config["ranking_info"]
    (tmp_path / "old" / "noise_config.json").write_text(json.dumps(config))
    old = tn.NoiseHooks.load(tmp_path / "old", model, attach=False)
    assert {layer.form for _, layer in old.items()} == {"additive"}
    assert old.node_scores is None


def test_head_importance_is_the_heads_part_of_node_importance():
    model = freeze(build_native_model(TINY))
    tokens, mask = tiny_data()
    hooks = ["blocks.*.attn.hook_z", "blocks.*.hook_mlp_out", "hook_embed"]
    with tn.attach_noise(model, hooks, calibration_tokens=tokens) as noise:
        tn.fit(model, noise, tokens, loss_mask=mask, steps=5, batch_size=8, quiet=True)
        scores = tn.node_importance(noise)
        heads = tn.head_importance(noise)
        stds = noise.stds()
    assert list(scores)[-1] == "hook_embed" and "m1" in scores
    for layer in range(2):
        for head in range(4):
            assert heads[layer, head].item() == pytest.approx(scores[f"a{layer}.h{head}"])
            assert scores[f"a{layer}.h{head}"] == pytest.approx(
                -stds[f"blocks.{layer}.attn.hook_z"][head].log().item(), rel=1e-6
            )
    assert scores["m0"] == pytest.approx(-stds["blocks.0.hook_mlp_out"].log().item(), rel=1e-6)
    assert scores["hook_embed"] == pytest.approx(
        -stds["hook_embed"].double().log().mean().item(), rel=1e-6
    )


def test_the_mlp_glob_may_match_nothing_on_an_attention_only_model():
    model = freeze(build_native_model({**TINY, "attn_only": True, "d_mlp": None}))
    tokens, _ = tiny_data()
    hooks = ["blocks.*.attn.hook_z", "blocks.*.hook_mlp_out"]
    with tn.attach_noise(model, hooks, calibration_tokens=tokens) as noise:
        assert noise.hook_names == ["blocks.0.attn.hook_z", "blocks.1.attn.hook_z"]
        assert not any(n.startswith("m") for n in tn.node_importance(noise))
    # 4.x has no MLP hook points at all; 3.x has them, but they never fire
    with pytest.raises(ValueError, match="none of the (patterns|hook points)"):
        tn.attach_noise(model, ["blocks.*.hook_mlp_out", "blocks.*.mlp.hook_post"])
    if TL_MAJOR >= 4:  # an exact name still has to exist (3.x has the point; it is skipped)
        with pytest.raises(ValueError, match="unknown hook point 'blocks.0.hook_mlp_out'"):
            tn.attach_noise(model, ["blocks.*.attn.hook_z", "blocks.0.hook_mlp_out"])
