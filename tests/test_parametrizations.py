"""SP / NTP / muP scales (FORMULAS section 4) and the param-group helpers."""

import math

import pytest
import torch
from torch import nn

from tl_noise.scaling.parametrizations import (
    LAYER_TYPES,
    MaximalUpdate,
    NeuralTangent,
    Parametrization,
    ParamSpec,
    ScalingRules,
    Standard,
    UndefinedScaleError,
    init_,
    initialize,
    optimizer_family,
    param_groups,
    param_specs_from_module,
    parametrization_from_name,
)

FAN_IN, FAN_OUT = 64, 256
ALL = [Standard(), NeuralTangent(), MaximalUpdate()]
UNDEFINED = "undefined"

# The FORMULAS section 4 table, with fan_in = 64, fan_out = 256. Keys: (name, layer_type).
WEIGHT_INIT = {
    **{("sp", lt): 1 / 8 for lt in LAYER_TYPES},
    **{("ntp", lt): 1.0 for lt in LAYER_TYPES},
    ("mup", "input"): 1 / 8,
    ("mup", "hidden"): 1 / 8,
    ("mup", "output"): 1 / 64,
}
BIAS_INIT = {(name, lt): 1.0 for name in ("sp", "ntp", "mup") for lt in LAYER_TYPES}
# Keys: (name, optimizer family, layer_type).
WEIGHT_LR = {
    **{("sp", opt, lt): 1.0 for opt in ("SGD", "Adam") for lt in LAYER_TYPES},
    ("ntp", "SGD", "input"): 1.0,
    ("ntp", "SGD", "hidden"): 1 / 64,
    ("ntp", "SGD", "output"): 1 / 64,
    **{("ntp", "Adam", lt): UNDEFINED for lt in LAYER_TYPES},
    ("mup", "SGD", "input"): 256.0,
    ("mup", "SGD", "hidden"): 1.0,
    ("mup", "SGD", "output"): 1 / 64,
    ("mup", "Adam", "input"): 1.0,
    ("mup", "Adam", "hidden"): 1 / 64,
    ("mup", "Adam", "output"): 1 / 64,
}
BIAS_LR = {
    **{("sp", opt, lt): 1.0 for opt in ("SGD", "Adam") for lt in LAYER_TYPES},
    **{("ntp", opt, lt): 1 / 64 for opt in ("SGD", "Adam") for lt in LAYER_TYPES},
    **{("mup", "SGD", lt): 256.0 for lt in LAYER_TYPES},
    **{("mup", "Adam", lt): 1.0 for lt in LAYER_TYPES},
}


@pytest.mark.parametrize(("name", "layer_type"), list(WEIGHT_INIT))
def test_weight_init_scale_table(name, layer_type):
    p = parametrization_from_name(name)
    expected = WEIGHT_INIT[name, layer_type]
    assert p.weight_init_scale(FAN_IN, FAN_OUT, layer_type) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(("name", "layer_type"), list(BIAS_INIT))
def test_bias_init_scale_table(name, layer_type):
    p = parametrization_from_name(name)
    assert p.bias_init_scale(FAN_IN, FAN_OUT, layer_type) == BIAS_INIT[name, layer_type]


@pytest.mark.parametrize("optimizer_case", [str, str.lower, str.upper])
@pytest.mark.parametrize(("name", "family", "layer_type"), list(WEIGHT_LR))
def test_weight_lr_scale_table(name, family, layer_type, optimizer_case):
    p = parametrization_from_name(name)
    expected = WEIGHT_LR[name, family, layer_type]
    names = ["SGD"] if family == "SGD" else ["Adam", "AdamW"]
    for optimizer in map(optimizer_case, names):
        if expected == UNDEFINED:
            with pytest.raises(UndefinedScaleError, match="Adam"):
                p.weight_lr_scale(FAN_IN, FAN_OUT, optimizer, layer_type)
        else:
            got = p.weight_lr_scale(FAN_IN, FAN_OUT, optimizer, layer_type)
            assert got == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(("name", "family", "layer_type"), list(BIAS_LR))
def test_bias_lr_scale_table(name, family, layer_type):
    p = parametrization_from_name(name)
    for optimizer in ["SGD"] if family == "SGD" else ["Adam", "AdamW", "adamw"]:
        got = p.bias_lr_scale(FAN_IN, FAN_OUT, optimizer, layer_type)
        assert got == pytest.approx(BIAS_LR[name, family, layer_type], rel=1e-12)


@pytest.mark.parametrize("p", ALL, ids=repr)
def test_adamw_scales_as_adam(p):
    for layer_type in LAYER_TYPES:
        for fan_in, fan_out in [(1, 1), (3, 17), (512, 8)]:
            assert p.bias_lr_scale(fan_in, fan_out, "AdamW", layer_type) == p.bias_lr_scale(
                fan_in, fan_out, "Adam", layer_type
            )
            if isinstance(p, NeuralTangent):
                continue
            assert p.weight_lr_scale(fan_in, fan_out, "AdamW", layer_type) == p.weight_lr_scale(
                fan_in, fan_out, "Adam", layer_type
            )


def test_default_layer_type_is_hidden():
    p = MaximalUpdate()
    assert p.weight_lr_scale(FAN_IN, FAN_OUT, "Adam") == p.weight_lr_scale(
        FAN_IN, FAN_OUT, "Adam", "hidden"
    )
    assert p.weight_init_scale(FAN_IN, FAN_OUT) == 1 / 8


def test_mup_hidden_adam_lr_halves_when_fan_in_doubles():
    p = MaximalUpdate()
    for fan_in in [16, 64, 1024]:
        narrow = p.weight_lr_scale(fan_in, fan_in, "Adam", "hidden")
        wide = p.weight_lr_scale(2 * fan_in, 2 * fan_in, "Adam", "hidden")
        assert wide == pytest.approx(narrow / 2)
    # SP does not adapt: the same base lr means a relatively larger step on a wider model.
    assert Standard().weight_lr_scale(128, 128, "Adam") == Standard().weight_lr_scale(
        64, 64, "Adam"
    )


def _hidden_update_rms(width: int, parametrization: Parametrization) -> float:
    """RMS change of ``x @ W`` after one Adam step on a hidden [width, width] weight."""
    generator = torch.Generator().manual_seed(0)
    weight = nn.Parameter(torch.empty(width, width))
    spec = ParamSpec("W", weight, width, width, "hidden")
    init_(spec, parametrization, generator=generator)
    x = torch.randn(width, generator=generator)
    before = (x @ weight).detach()
    optimizer = torch.optim.Adam(param_groups([spec], lr=1e-2, parametrization=parametrization))
    (x @ weight).sum().backward()
    optimizer.step()
    return (x @ weight.detach() - before).pow(2).mean().sqrt().item()


def test_mup_lr_transfers_across_width_with_adam():
    # Adam's first step moves every entry by ~lr, aligned with x, so (x @ dW) grows like
    # width * lr. muP's 1/fan_in lr keeps the feature change width-independent; SP's does not.
    mup_ratio = _hidden_update_rms(512, MaximalUpdate()) / _hidden_update_rms(64, MaximalUpdate())
    sp_ratio = _hidden_update_rms(512, Standard()) / _hidden_update_rms(64, Standard())
    assert 0.8 < mup_ratio < 1.25
    assert 6.0 < sp_ratio < 10.0


@pytest.mark.parametrize("p", ALL, ids=repr)
def test_errors_name_the_bad_value(p):
    with pytest.raises(ValueError, match=r"\('SGD', 'Adam', 'AdamW'\).*got 'RMSprop'"):
        p.weight_lr_scale(FAN_IN, FAN_OUT, "RMSprop")
    with pytest.raises(ValueError, match="'RMSprop'"):
        p.bias_lr_scale(FAN_IN, FAN_OUT, "RMSprop")
    with pytest.raises(ValueError, match=r"\('input', 'hidden', 'output'\), got 'middle'"):
        p.weight_init_scale(FAN_IN, FAN_OUT, "middle")
    with pytest.raises(ValueError, match="'middle'"):
        p.bias_lr_scale(FAN_IN, FAN_OUT, "SGD", "middle")
    with pytest.raises(ValueError, match="fan_in.*0"):
        p.weight_init_scale(0, FAN_OUT)
    with pytest.raises(ValueError, match="fan_out.*-3"):
        p.bias_init_scale(FAN_IN, -3)
    with pytest.raises(TypeError, match="fan_in.*2.5"):
        p.weight_init_scale(2.5, FAN_OUT)
    with pytest.raises(TypeError, match="fan_in.*True"):
        p.weight_init_scale(True, FAN_OUT)


def test_layer_type_is_checked_before_the_optimizer_rule_runs():
    # NTP + Adam is undefined, but a bad layer type must still be reported as such.
    with pytest.raises(ValueError, match="'middle'"):
        NeuralTangent().weight_lr_scale(FAN_IN, FAN_OUT, "Adam", "middle")


def test_ntp_adam_error_is_both_value_and_not_implemented_error():
    with pytest.raises(NotImplementedError, match="Jacot"):
        NeuralTangent().weight_lr_scale(FAN_IN, FAN_OUT, "Adam")
    with pytest.raises(ValueError, match="SGD"):
        NeuralTangent().weight_lr_scale(FAN_IN, FAN_OUT, "AdamW", "input")


def test_optimizer_family():
    assert optimizer_family("sgd") == "SGD"
    assert optimizer_family("ADAM") == "Adam"
    assert optimizer_family("AdamW") == "Adam"
    with pytest.raises(ValueError, match="None"):
        optimizer_family(None)


def test_parametrization_from_name_and_names():
    assert parametrization_from_name("sp") == Standard()
    assert parametrization_from_name("Standard") == Standard()
    assert parametrization_from_name(" NTP ") == NeuralTangent()
    assert parametrization_from_name("muP") == MaximalUpdate()
    assert [p.name for p in ALL] == ["sp", "ntp", "mup"]
    for p in ALL:
        assert parametrization_from_name(p.name) == p
        assert parametrization_from_name(type(p).__name__) == p
    assert MaximalUpdate() != Standard()
    assert len({MaximalUpdate(), MaximalUpdate(), Standard()}) == 2
    assert repr(MaximalUpdate()) == "MaximalUpdate()"
    with pytest.raises(ValueError, match=r"'mu-p'.*mup"):
        parametrization_from_name("mu-p")


def test_parametrization_is_abstract_and_rules_must_be_complete():
    with pytest.raises(TypeError):
        Parametrization()
    one = {lt: (lambda fi, fo: 1.0) for lt in LAYER_TYPES}
    with pytest.raises(ValueError, match="weight_lr"):
        ScalingRules(
            weight_init=one,
            bias_init=one,
            weight_lr={("SGD", "hidden"): lambda fi, fo: 1.0},
            bias_lr={(f, lt): lambda fi, fo: 1.0 for f in ("SGD", "Adam") for lt in LAYER_TYPES},
        )


def test_param_spec_validation():
    p = nn.Parameter(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="fan_in"):
        ParamSpec("W", p, 0, 4)
    with pytest.raises(ValueError, match="'middle'"):
        ParamSpec("W", p, 3, 4, "middle")
    with pytest.raises(ValueError, match="'gain'"):
        ParamSpec("W", p, 3, 4, kind="gain")
    with pytest.raises(TypeError, match="param must be a tensor"):
        ParamSpec("W", [1.0], 3, 4)
    spec = ParamSpec("W", p, 3, 4)
    assert (spec.layer_type, spec.kind) == ("hidden", "weight")
    assert spec != ParamSpec("W", p, 3, 4)  # identity, not tensor equality


class _Estimator(nn.Module):
    """A tiny std estimator with TransformerLens-layout [d_in, d_out] weights."""

    def __init__(self, d_in: int = 8, d_hidden: int = 32, d_out: int = 4) -> None:
        super().__init__()
        self.W_in = nn.Parameter(torch.zeros(d_in, d_hidden))
        self.b_in = nn.Parameter(torch.zeros(d_hidden))
        self.mid = nn.Module()
        self.mid.weight = nn.Parameter(torch.zeros(d_hidden, d_hidden))
        self.mid.bias = nn.Parameter(torch.zeros(d_hidden))
        self.W_out = nn.Parameter(torch.zeros(d_hidden, d_out))
        self.b_out = nn.Parameter(torch.zeros(d_out))
        self.frozen = nn.Parameter(torch.zeros(5, 5), requires_grad=False)


def test_param_specs_from_module_fans_kinds_and_layer_types():
    module = _Estimator()
    specs = param_specs_from_module(
        module, {"W_in": "input", "W_out": "output", "b_out": "output", "mid": "hidden"}
    )
    got = {s.name: (s.fan_in, s.fan_out, s.layer_type, s.kind) for s in specs}
    assert got == {
        "W_in": (8, 32, "input", "weight"),
        "b_in": (1, 32, "hidden", "bias"),
        "mid.weight": (32, 32, "hidden", "weight"),
        "mid.bias": (1, 32, "hidden", "bias"),
        "W_out": (32, 4, "output", "weight"),
        "b_out": (1, 4, "output", "bias"),
    }
    assert {id(s.param) for s in specs} == {
        id(p) for n, p in module.named_parameters() if n != "frozen"
    }


def test_param_specs_from_module_prefixes_longest_match_and_defaults():
    module = _Estimator()
    specs = param_specs_from_module(module, {"mid": "input", "mid.bias": "output"})
    by_name = {s.name: s.layer_type for s in specs}
    assert by_name["mid.weight"] == "input"
    assert by_name["mid.bias"] == "output"
    assert by_name["W_in"] == "hidden"
    assert all(s.layer_type == "hidden" for s in param_specs_from_module(module))


def test_param_specs_from_module_errors_and_bias_names():
    with pytest.raises(ValueError, match=r"\['W_hidden'\].*W_in"):
        param_specs_from_module(_Estimator(), {"W_hidden": "output"})
    with pytest.raises(ValueError, match=r"layer_types\['W_in'\].*'middle'"):
        param_specs_from_module(_Estimator(), {"W_in": "middle"})
    module = nn.Module()
    module.W_QK = nn.Parameter(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match=r"'W_QK'.*\(2, 3, 4\)"):
        param_specs_from_module(module)
    module = nn.Module()
    module.b_Q = nn.Parameter(torch.zeros(2, 3))  # TransformerLens [n_heads, d_head] bias
    (spec,) = param_specs_from_module(module)
    assert (spec.kind, spec.fan_in, spec.fan_out) == ("bias", 1, 6)


def test_param_groups_lr_values_and_optimizers_accept_them():
    module = _Estimator()
    specs = param_specs_from_module(
        module, {"W_in": "input", "b_in": "input", "W_out": "output", "b_out": "output"}
    )
    groups = param_groups(specs, lr=1e-2)  # default: muP, Adam
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs == pytest.approx(
        {
            "W_in": 1e-2,
            "b_in": 1e-2,
            "mid.weight": 1e-2 / 32,
            "mid.bias": 1e-2,
            "W_out": 1e-2 / 32,
            "b_out": 1e-2,
        }
    )
    assert all(len(g["params"]) == 1 for g in groups)
    sgd = {g["name"]: g["lr"] for g in param_groups(specs, 0.1, "SGD", MaximalUpdate())}
    assert sgd == pytest.approx(
        {
            "W_in": 0.1 * 32,
            "b_in": 0.1 * 32,
            "mid.weight": 0.1,
            "mid.bias": 0.1 * 32,
            "W_out": 0.1 / 32,
            "b_out": 0.1 * 4,
        }
    )
    sp = param_groups(specs, 3e-4, "AdamW", Standard())
    assert [g["lr"] for g in sp] == [3e-4] * len(specs)
    sgd_groups = param_groups(specs, 0.1, "SGD")
    for optimizer, source in [
        (torch.optim.Adam(groups), groups),
        (torch.optim.SGD(sgd_groups), sgd_groups),
    ]:
        assert [g["lr"] for g in optimizer.param_groups] == [g["lr"] for g in source]
        assert [g["name"] for g in optimizer.param_groups] == [s.name for s in specs]
        module.W_out.grad = torch.ones_like(module.W_out)
        optimizer.step()
    assert torch.all(module.W_out != 0)


def test_param_groups_validation():
    specs = param_specs_from_module(_Estimator())
    for lr in [0, -1e-3, math.nan, math.inf, True, "1e-3", None]:
        with pytest.raises(ValueError, match="lr must be"):
            param_groups(specs, lr)
    with pytest.raises(ValueError, match="'Adagrad'"):
        param_groups([], 1e-3, "Adagrad")
    with pytest.raises(UndefinedScaleError):
        param_groups(specs, 1e-3, "Adam", NeuralTangent())
    assert [g["lr"] for g in param_groups(specs, 1.0, "SGD", NeuralTangent())][:2] == [1 / 8, 1.0]
    twice = [specs[0], ParamSpec("again", specs[0].param, 8, 32)]
    with pytest.raises(ValueError, match="'again' is the same tensor as 'W_in'"):
        param_groups(twice, 1e-3)
    same_name = [specs[0], ParamSpec("W_in", specs[1].param, 1, 32, kind="bias")]
    with pytest.raises(ValueError, match="'W_in'"):
        param_groups(same_name, 1e-3)


@pytest.mark.parametrize(
    ("p", "layer_type", "kind", "expected"),
    [
        (MaximalUpdate(), "hidden", "weight", 1 / 32),
        (MaximalUpdate(), "output", "weight", 1 / 1024),
        (Standard(), "output", "weight", 1 / 32),
        (NeuralTangent(), "hidden", "weight", 1.0),
        (MaximalUpdate(), "hidden", "bias", 1.0),
    ],
)
def test_init_scales_empirically(p, layer_type, kind, expected):
    param = nn.Parameter(torch.empty(1024, 256))
    spec = ParamSpec("W", param, 1024, 256, layer_type, kind)
    assert init_(spec, p, generator=torch.Generator().manual_seed(1)) is param
    assert param.std().item() == pytest.approx(expected, rel=0.02)
    assert abs(param.mean().item()) < 0.01 * expected


def test_initialize_defaults_to_mup_and_is_reproducible():
    first, second = _Estimator(), _Estimator()
    layer_types = {"W_in": "input", "W_out": "output"}
    initialize(
        param_specs_from_module(first, layer_types), generator=torch.Generator().manual_seed(0)
    )
    initialize(
        param_specs_from_module(second, layer_types),
        MaximalUpdate(),
        generator=torch.Generator().manual_seed(0),
    )
    for (name, a), b in zip(first.named_parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b), name
    assert torch.count_nonzero(first.frozen) == 0  # frozen parameters are left alone
    assert first.W_out.std().item() == pytest.approx(1 / 32, rel=0.25)
    assert first.W_in.std().item() == pytest.approx(1 / math.sqrt(8), rel=0.25)
