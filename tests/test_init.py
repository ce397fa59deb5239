"""tl_noise.scaling.init: agreement with TransformerLens, the W_O fix, and layout parsing."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformer_lens.utilities import initialization_utils as tl_init

from tl_noise.scaling.init import (
    HEAD_AXES,
    calc_fan_in_and_fan_out,
    init_kaiming_normal_,
    init_kaiming_uniform_,
    init_xavier_normal_,
    init_xavier_uniform_,
    split_layout,
)

N_HEADS, D_MODEL, D_HEAD, D_MLP = 4, 32, 8, 128

# ---------------------------------------------------------------- fans: agreement with TL

sizes = st.integers(1, 64)


@settings(deadline=None, max_examples=60)
@given(shape=st.lists(sizes, min_size=1, max_size=3))
def test_fans_without_layout_equal_transformer_lens(shape):
    tensor = torch.empty(shape)
    assert calc_fan_in_and_fan_out(tensor) == tl_init.calc_fan_in_and_fan_out(tensor)


@pytest.mark.parametrize(
    ("shape", "layout", "fans"),
    [
        ((D_MODEL,), "d_model", (1, D_MODEL)),
        ((D_MODEL, D_MLP), "d_model d_mlp", (D_MODEL, D_MLP)),
        ((N_HEADS, D_MODEL, D_HEAD), "n_heads d_model d_head", (D_MODEL, N_HEADS * D_HEAD)),
    ],
)
def test_layouts_agree_with_transformer_lens_where_its_convention_holds(shape, layout, fans):
    tensor = torch.empty(shape)
    assert calc_fan_in_and_fan_out(tensor, layout) == fans
    assert tl_init.calc_fan_in_and_fan_out(tensor) == fans


def test_transformer_lens_fans_are_wrong_for_w_o():
    w_o = torch.empty(N_HEADS, D_HEAD, D_MODEL)  # [n_heads, d_head, d_model]
    # TransformerLens reads it as [n_heads, d_model, d_head]: fan_in = d_head.
    assert tl_init.calc_fan_in_and_fan_out(w_o) == (D_HEAD, N_HEADS * D_MODEL) == (8, 128)
    assert calc_fan_in_and_fan_out(w_o) == (8, 128)  # layout=None keeps TL's behaviour
    # W_O maps the concatenated heads to the residual stream.
    true = calc_fan_in_and_fan_out(w_o, "n_heads d_head d_model")
    assert true == (N_HEADS * D_HEAD, D_MODEL) == (32, 32)
    assert calc_fan_in_and_fan_out(w_o, "n_heads d_head -> d_model") == true
    # The consequence: TL's Kaiming std for W_O is sqrt(n_heads) too large.
    torch.manual_seed(0)
    tl_std = tl_init.init_kaiming_normal_(torch.empty(64, D_HEAD, D_MODEL), nonlinearity="linear")
    ours = init_kaiming_normal_(
        torch.empty(64, D_HEAD, D_MODEL), nonlinearity="linear", layout="n_heads d_head d_model"
    )
    assert tl_std.std().item() == pytest.approx(1 / math.sqrt(D_HEAD), rel=0.03)
    assert ours.std().item() == pytest.approx(1 / math.sqrt(64 * D_HEAD), rel=0.03)


@pytest.mark.parametrize(
    ("shape", "message"),
    [((), "scalars"), ((2, 3, 4, 5), r"shape \(2, 3, 4, 5\)")],
)
def test_fans_without_layout_reject_what_transformer_lens_rejects(shape, message):
    tensor = torch.empty(shape)
    with pytest.raises(ValueError, match=message):
        calc_fan_in_and_fan_out(tensor)
    with pytest.raises(ValueError):
        tl_init.calc_fan_in_and_fan_out(tensor)


# ---------------------------------------------------------------- init functions vs TL

INITS = [
    (init_kaiming_normal_, tl_init.init_kaiming_normal_, {}),
    (init_kaiming_uniform_, tl_init.init_kaiming_uniform_, {}),
    (init_kaiming_normal_, tl_init.init_kaiming_normal_, {"nonlinearity": "linear", "gain": 0.5}),
    (init_kaiming_uniform_, tl_init.init_kaiming_uniform_, {"mode": "fan_out"}),
    (init_kaiming_normal_, tl_init.init_kaiming_normal_, {"nonlinearity": "leaky_relu", "a": 0.2}),
    (init_xavier_normal_, tl_init.init_xavier_normal_, {}),
    (init_xavier_uniform_, tl_init.init_xavier_uniform_, {"gain": 2.0}),
]


@pytest.mark.parametrize(("ours", "theirs", "kwargs"), INITS)
@pytest.mark.parametrize("shape", [(D_MLP,), (D_MODEL, D_MLP), (N_HEADS, D_MODEL, D_HEAD)])
def test_init_draws_exactly_what_transformer_lens_draws(ours, theirs, kwargs, shape):
    torch.manual_seed(1)
    expected = theirs(torch.empty(shape), **kwargs)
    torch.manual_seed(1)
    assert torch.equal(ours(torch.empty(shape), **kwargs), expected)


def kaiming_std(fan: int, nonlinearity: str = "relu", gain: float = 1.0) -> float:
    return gain * torch.nn.init.calculate_gain(nonlinearity) / math.sqrt(fan)


def xavier_std(fan_in: int, fan_out: int, gain: float = 1.0) -> float:
    return gain * math.sqrt(2.0 / (fan_in + fan_out))


@pytest.mark.parametrize(
    ("shape", "layout", "fan_in", "fan_out"),
    [
        ((256, 512), None, 256, 512),
        ((8, 256, 64), None, 256, 512),
        ((8, 64, 256), "n_heads d_head d_model", 512, 256),
    ],
)
def test_empirical_std_and_uniform_bounds(shape, layout, fan_in, fan_out):
    torch.manual_seed(2)
    cases = [
        (init_kaiming_normal_, {}, kaiming_std(fan_in), False),
        (init_kaiming_normal_, {"mode": "fan_out"}, kaiming_std(fan_out), False),
        (init_kaiming_uniform_, {"nonlinearity": "linear"}, kaiming_std(fan_in, "linear"), True),
        (init_xavier_normal_, {}, xavier_std(fan_in, fan_out), False),
        (init_xavier_uniform_, {"gain": 0.5}, xavier_std(fan_in, fan_out, 0.5), True),
    ]
    for init, kwargs, std, uniform in cases:
        tensor = init(torch.empty(shape), layout=layout, **kwargs)
        assert tensor.std().item() == pytest.approx(std, rel=0.02), init.__name__
        assert abs(tensor.mean().item()) < 0.02 * std
        if uniform:
            bound = math.sqrt(3.0) * std
            assert tensor.abs().max().item() <= bound
            assert tensor.abs().max().item() > 0.999 * bound


def test_init_fills_parameters_in_place_and_returns_them():
    weight = torch.nn.Parameter(torch.zeros(N_HEADS, D_HEAD, D_MODEL))
    out = init_xavier_normal_(weight, layout="n_heads d_head d_model")
    assert out is weight and weight.requires_grad and weight.abs().sum() > 0


def test_unknown_kaiming_mode_is_rejected():
    with pytest.raises(ValueError, match="'fanin'"):
        init_kaiming_normal_(torch.empty(4, 4), mode="fanin")


def test_layout_is_keyword_only():
    with pytest.raises(TypeError):
        init_xavier_normal_(torch.empty(4, 4), 1.0, "d_in d_out")


# ---------------------------------------------------------------- layout parsing


@pytest.mark.parametrize(
    ("layout", "inputs", "outputs"),
    [
        ("n_heads d_model d_head", ("d_model",), ("n_heads", "d_head")),
        ("n_heads d_head d_model", ("n_heads", "d_head"), ("d_model",)),
        ("d_model d_mlp", ("d_model",), ("d_mlp",)),
        ("d_mlp d_model", ("d_mlp",), ("d_model",)),
        ("n_key_value_heads d_model d_head", ("d_model",), ("n_key_value_heads", "d_head")),
        ("n_kv_heads d_model d_head", ("d_model",), ("n_kv_heads", "d_head")),
        ("n_heads d_head -> d_model", ("n_heads", "d_head"), ("d_model",)),
        ("d_model->d_mlp", ("d_model",), ("d_mlp",)),
        ("  d_model   d_mlp  ", ("d_model",), ("d_mlp",)),
        ("d_vocab", (), ("d_vocab",)),
        ("n_heads d_head", (), ("n_heads", "d_head")),
        # No d_head: heads join the output side.
        ("n_heads d_model d_mlp", ("d_model",), ("n_heads", "d_mlp")),
        ("n_heads", (), ("n_heads",)),
        ("pos d_model d_mlp", ("pos", "d_model"), ("d_mlp",)),
    ],
)
def test_split_layout(layout, inputs, outputs):
    assert split_layout(layout) == (inputs, outputs)


def test_head_axes():
    assert HEAD_AXES == {"n_heads", "n_key_value_heads", "n_kv_heads"}


def test_fans_with_layouts():
    w_k_gqa = torch.empty(2, D_MODEL, D_HEAD)
    assert calc_fan_in_and_fan_out(w_k_gqa, "n_key_value_heads d_model d_head") == (D_MODEL, 16)
    w_out = torch.empty(D_MLP, D_MODEL)
    assert calc_fan_in_and_fan_out(w_out, "d_mlp d_model") == (D_MLP, D_MODEL)
    four_d = torch.empty(2, 3, 5, 7)
    assert calc_fan_in_and_fan_out(four_d, "a b -> c d") == (6, 35)
    assert calc_fan_in_and_fan_out(four_d, "a b c d") == (30, 7)
    assert calc_fan_in_and_fan_out(torch.empty(N_HEADS, D_HEAD), "n_heads d_head") == (1, 32)


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("", "names no axes"),
        ("   ", "names no axes"),
        ("d_model d_model", "repeats axis 'd_model'"),
        ("(n_heads d_head) d_model", r"axis '\(n_heads'"),
        ("... d_model", r"axis '\.\.\.'"),
        ("d_model 3", "axis '3'"),
        ("a -> b -> c", "2 '->'"),
        ("d_model ->", "no axes after '->'"),
        ("-> d_model", "no axes before '->'"),
        ("d_model - > d_mlp", "axis '-'"),
    ],
)
def test_bad_layouts(layout, message):
    with pytest.raises(ValueError, match=message):
        split_layout(layout)


def test_layout_must_be_a_string():
    with pytest.raises(TypeError, match="list"):
        split_layout(["d_model", "d_mlp"])


@pytest.mark.parametrize(
    ("shape", "layout"),
    [((4, 8), "n_heads d_model d_head"), ((4, 8, 16), "d_model d_mlp"), ((4,), "a -> b")],
)
def test_layout_axis_count_must_match_the_tensor(shape, layout):
    with pytest.raises(ValueError) as info:
        calc_fan_in_and_fan_out(torch.empty(shape), layout)
    message = str(info.value)
    assert repr(layout) in message
    assert f"{len(shape)} dimensions" in message and str(shape) in message


def test_layout_cannot_make_a_scalar_have_fans():
    with pytest.raises(ValueError, match="scalars"):
        calc_fan_in_and_fan_out(torch.tensor(1.0), "d_model")
