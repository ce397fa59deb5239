"""Bad input: every case raises a clear error naming the offending value, and nothing is lost.

"Nothing lost" means: files that existed before (a saved noise directory, a run directory with
checkpoints) are byte-identical afterwards, the noise a failed call was given keeps its state, and
a model involved has no tl-noise hooks left and computes bit-identical outputs.

A full disk is simulated by replacing ``tl_noise.io._write_all``, the one low-level write every
file goes through, with one that writes half of the data and raises ``OSError(ENOSPC)``.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

import tl_noise as tn
import tl_noise.io as tio
from tl_noise.fitting import fit
from tl_noise.fitting.trainer import batch_indices
from tl_noise.hooks import NoiseHooks
from tl_noise.runs import latest_checkpoint, read_history

pytestmark = pytest.mark.tl3

HOOKS = "blocks.*.attn.hook_z"
NAN, INF = float("nan"), float("inf")
FIT = dict(batch_size=8, lr=0.05, seed=3, quiet=True, checkpoint_every=2)


# ----------------------------------------------------------------------------------- helpers
def count_hooks(model) -> int:
    points = {id(hp): hp for hp in model.hook_dict.values()}  # the bridge lists aliases twice
    return sum(len(hp.fwd_hooks) + len(hp._forward_hooks) for hp in points.values())


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().contiguous().view(torch.int32)  # NaN-safe bitwise comparison


def logits_of(model, tokens) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens)


def assert_model_intact(model, tokens, reference) -> None:
    assert count_hooks(model) == 0, "tl-noise hooks were left on the model"
    assert torch.equal(bits(logits_of(model, tokens)), bits(reference))


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (hidden ones too) -> its bytes."""
    path = Path(path)
    if path.is_file():
        return {".": path.read_bytes()}
    return {
        str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()
    }


def noise_state(noise) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in noise.state_dict().items()}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(bits(a[key]), bits(b[key])), key


def embedding_weight(model) -> torch.nn.Parameter:
    d_vocab, d_model = model.cfg.d_vocab, model.cfg.d_model
    return next(
        p for n, p in model.named_parameters() if "embed" in n and p.shape == (d_vocab, d_model)
    )


# ---------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def model(make_model):
    m = make_model()
    m.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


@pytest.fixture(scope="module")
def data():
    tokens = torch.randint(0, 50, (24, 12), generator=torch.Generator().manual_seed(0))
    tokens[0, :2] = torch.tensor([0, 49])  # the range is exactly [0, 49]
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, 6:] = True
    return tokens, mask


@pytest.fixture(scope="module")
def reference(model, data):
    return logits_of(model, data[0])


@pytest.fixture()
def intact(model, data, reference):
    """Checks, after the test body, that the shared model is exactly as it was."""
    assert_model_intact(model, data[0], reference)
    yield
    assert_model_intact(model, data[0], reference)


def attach(model, tokens, hooks=HOOKS, **kw):
    return tn.attach_noise(model, hooks, calibration_tokens=tokens, **kw)


@pytest.fixture(scope="module")
def saved_noise(model, data, tmp_path_factory):
    """A noise directory saved from trained-looking noise (perturbed rhos)."""
    path = tmp_path_factory.mktemp("saved") / "noise"
    with attach(model, data[0]) as noise:
        with torch.no_grad():
            for p in noise.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
        noise.save(path)
    return path


@pytest.fixture(scope="module")
def base_run(model, data, tmp_path_factory):
    """A completed 4-step run (checkpoints at steps 2 and 4)."""
    run = tmp_path_factory.mktemp("runs") / "base"
    tokens, mask = data
    with attach(model, tokens) as noise:
        fit(model, noise, tokens, loss_mask=mask, steps=4, run_dir=run, **FIT)
    return run


@pytest.fixture(scope="module")
def uninterrupted_8(model, data, tmp_path_factory):
    """The same run fitted for 8 steps in one go: its final noise state."""
    run = tmp_path_factory.mktemp("runs") / "full"
    tokens, mask = data
    with attach(model, tokens) as noise:
        fit(model, noise, tokens, loss_mask=mask, steps=8, run_dir=run, **FIT)
    return tio.read_tensors(run / "final" / "noise_state.safetensors")


@pytest.fixture()
def run_copy(base_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    return run


class FullDisk:
    """Makes every write to a path containing ``match`` fail half-way with ENOSPC."""

    def __init__(self, monkeypatch):
        self.match: str | None = None
        self.skip = 0
        self.failed: list[str] = []
        real = tio._write_all

        def write(fd, data, path):
            if self.match is not None and self.match in str(path):
                if self.skip == 0:
                    self.failed.append(str(path))
                    os.write(fd, data[: len(data) // 2])
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                self.skip -= 1
            real(fd, data, path)

        monkeypatch.setattr(tio, "_write_all", write)

    def fill(self, match: str, skip: int = 0) -> None:
        self.match, self.skip = match, skip

    def free(self) -> None:
        self.match = None


@pytest.fixture()
def disk(monkeypatch):
    return FullDisk(monkeypatch)


ENOSPC = re.escape(os.strerror(errno.ENOSPC))


# ------------------------------------------------------------------ attach_noise: bad settings
def cloak(**kw):
    return tn.CloakStandardDeviationParameterization(**kw)


ATTACH_CASES = {
    "scale-reversed": (
        lambda m, t: attach(m, t, parameterization=cloak(scale=(2.0, 1.0))),
        ValueError,
        "min_scale=2.0 is not below max_scale=1.0",
    ),
    "scale-infinite": (
        lambda m, t: attach(m, t, parameterization=cloak(scale=(0.0, INF))),
        ValueError,
        "max_scale=inf",
    ),
    "scale-negative": (
        lambda m, t: attach(m, t, parameterization=cloak(scale=(-1.0, 1.0))),
        ValueError,
        "min_scale=-1.0 is negative",
    ),
    "scale-not-a-pair": (
        lambda m, t: attach(m, t, parameterization=cloak(scale="ab")),
        TypeError,
        "'ab'",
    ),
    "shallow-zero": (
        lambda m, t: attach(m, t, parameterization=cloak(shallow=0)),
        ValueError,
        "shallow must be a finite number > 0, got 0",
    ),
    "shallow-nan": (
        lambda m, t: attach(m, t, parameterization=cloak(shallow=NAN)),
        ValueError,
        "shallow must be a finite number > 0, got nan",
    ),
    "softplus-min-negative": (
        lambda m, t: attach(
            m, t, parameterization=tn.SoftplusStandardDeviationParameterization(min_scale=-0.5)
        ),
        ValueError,
        "got -0.5",
    ),
    "parameterization-is-a-string": (
        lambda m, t: attach(m, t, parameterization="cloak"),
        TypeError,
        "parameterization='cloak'",
    ),
    "init-std-outside-range": (
        lambda m, t: attach(m, t, init_std=5.0),
        ValueError,
        r"init_std=5.0 .*\[0.0001, 2\]",
    ),
    "init-std-nan": (lambda m, t: attach(m, t, init_std=NAN), ValueError, "init_std=nan"),
    "head-granularity-on-residual": (
        lambda m, t: attach(m, t, "blocks.0.hook_resid_pre", granularity="head"),
        ValueError,
        r"granularity='head' at 'blocks.0.hook_resid_pre' .*\[batch, pos, 32\]",
    ),
    "head-feature-granularity-on-mlp": (
        lambda m, t: attach(m, t, "blocks.1.mlp.hook_post", granularity="head_feature"),
        ValueError,
        r"granularity='head_feature' at 'blocks.1.mlp.hook_post' .*\[batch, pos, 64\]",
    ),
    "unknown-granularity": (
        lambda m, t: attach(m, t, granularity="diag"),
        ValueError,
        "granularity='diag'.*accepted: hook, head, feature, head_feature",
    ),
    "unknown-hook-name": (
        lambda m, t: attach(m, t, "blocks.0.attn.hook_zz"),
        ValueError,
        r"unknown hook point 'blocks.0.attn.hook_zz'; closest: blocks\.0\.attn\.hook_z\b",
    ),
    "pattern-matches-no-hook": (
        lambda m, t: attach(m, t, "blocks.7.*"),
        ValueError,
        re.escape("unknown hook point 'blocks.7.*'"),
    ),
    "hooks-not-a-name": (lambda m, t: attach(m, t, 5), TypeError, "hooks=5"),
    "attention-pattern-hook": (
        lambda m, t: attach(m, t, "blocks.0.attn.hook_pattern"),
        ValueError,
        "blocks.0.attn.hook_pattern",
    ),
    "calibration-tokens-outside-vocabulary": (
        lambda m, t: attach(m, torch.cat([t, torch.full((1, 12), 50)])),
        ValueError,
        re.escape("calibration_tokens must lie in [0, 49] (d_vocab=50); found [0, 50]"),
    ),
    "calibration-tokens-negative": (
        lambda m, t: attach(m, torch.cat([t, torch.full((1, 12), -3)])),
        ValueError,
        re.escape("found [-3, 49]"),
    ),
    "calibration-tokens-empty": (
        lambda m, t: attach(m, t[:0]),
        ValueError,
        re.escape("calibration_tokens has shape [0, 12]: the dataset is empty"),
    ),
    "calibration-tokens-float": (
        lambda m, t: attach(m, t.float()),
        TypeError,
        "calibration_tokens .*dtype torch.float32",
    ),
    "estimator-unknown-argument": (
        lambda m, t: attach(m, t, estimator={"d_hiden": 8}),
        TypeError,
        "d_hiden",
    ),
    "model-is-a-plain-module": (
        lambda m, t: tn.attach_noise(torch.nn.Linear(2, 2), HOOKS),
        TypeError,
        "got Linear",
    ),
}


@pytest.mark.parametrize("case", list(ATTACH_CASES))
def test_attach_noise_rejects(case, model, data, intact):
    call, exc, match = ATTACH_CASES[case]
    with pytest.raises(exc, match=match):
        call(model, data[0])


def test_attach_noise_rejects_a_huggingface_model(model, data, intact):
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).eval()
    with pytest.raises(TypeError, match="got GPT2LMHeadModel.*load_model"):
        tn.attach_noise(hf, HOOKS)
    assert not hf._forward_hooks and not any(m._forward_hooks for m in hf.modules())


def test_nan_activations_at_attach_name_the_hook(make_model, data):
    poisoned = make_model()
    with torch.no_grad():
        embedding_weight(poisoned)[7] = NAN
    tokens = data[0].clone()
    tokens[3, 5] = 7
    before = logits_of(poisoned, tokens)
    assert torch.isnan(before[3]).any()
    with pytest.raises(FloatingPointError, match=r"\['blocks.0.attn.hook_z', 'blocks.1.attn"):
        tn.attach_noise(poisoned, HOOKS, calibration_tokens=tokens)
    assert_model_intact(poisoned, tokens, before)


# -------------------------------------------------------------------------- fit: bad arguments
FIT_ARG_CASES = {
    "steps-zero": ({"steps": 0}, "steps=0"),
    "steps-negative": ({"steps": -3}, "steps=-3"),
    "steps-fractional": ({"steps": 2.5}, "steps=2.5"),
    "steps-bool": ({"steps": True}, "steps=True"),
    "lr-zero": ({"lr": 0}, "lr=0"),
    "lr-negative": ({"lr": -1.0}, "lr=-1.0"),
    "lr-nan": ({"lr": NAN}, "lr=nan"),
    "lr-inf": ({"lr": INF}, "lr=inf"),
    "batch-size-zero": ({"batch_size": 0}, "batch_size=0"),
    "batch-size-negative": ({"batch_size": -4}, "batch_size=-4"),
    "checkpoint-every-zero": ({"checkpoint_every": 0}, "checkpoint_every=0"),
    "alpha-above-one": ({"mode": "composite", "alpha": 1.5}, r"alpha=1.5; .*\[0, 1\]"),
    "alpha-negative": ({"mode": "composite", "alpha": -0.1}, r"alpha=-0.1; .*\[0, 1\]"),
    "alpha-nan": ({"mode": "composite", "alpha": NAN}, "alpha=nan"),
    "budget-negative": ({"mode": "budget", "budget": -1.0}, "budget=-1.0"),
    "budget-lr-nan": ({"mode": "budget", "budget": 0.1, "budget_lr": NAN}, "budget_lr=nan"),
    "unknown-mode": ({"mode": "fast"}, "mode='fast'"),
    "unknown-objective": ({"objective": "mse"}, "objective='mse'"),
    "unknown-noise-loss": ({"noise_loss_kind": "l2"}, "noise_loss_kind='l2'"),
    "resume-without-run-dir": ({"resume": True}, "resume=True needs run_dir"),
}


@pytest.mark.parametrize("case", list(FIT_ARG_CASES))
def test_fit_rejects_argument(case, model, data, intact):
    kwargs, match = FIT_ARG_CASES[case]
    tokens, mask = data
    with attach(model, tokens) as noise:
        before = noise_state(noise)
        with pytest.raises(ValueError, match=match):
            fit(model, noise, tokens, loss_mask=mask, quiet=True, **kwargs)
        assert_same_state(noise_state(noise), before)
        assert noise.attached


def _tokens_with(value):
    def make(tokens):
        bad = tokens.clone()
        bad[5, 7] = value
        return bad

    return make


FIT_DATA_CASES = {
    "tokens-outside-vocabulary": (
        _tokens_with(50),
        None,
        ValueError,
        re.escape("tokens must lie in [0, 49] (d_vocab=50); found [0, 50]"),
    ),
    "tokens-negative": (_tokens_with(-1), None, ValueError, re.escape("found [-1, 49]")),
    "no-examples": (lambda t: t[:0], None, ValueError, re.escape("shape [0, 12]: the dataset")),
    "no-positions": (lambda t: t[:, :0], None, ValueError, re.escape("shape [24, 0]: the data")),
    "tokens-float": (lambda t: t.float(), None, TypeError, "dtype torch.float32"),
    "tokens-bool": (lambda t: t > 20, None, TypeError, "dtype torch.bool"),
    "tokens-one-dimensional": (lambda t: t[0], None, TypeError, re.escape("shape [12]")),
    "tokens-on-meta-device": (lambda t: t.to("meta"), None, ValueError, "meta device"),
    "tokens-a-list": (lambda t: t.tolist(), None, TypeError, "got list"),
    "mask-selects-nothing": (
        None,
        lambda m: torch.zeros_like(m),
        ValueError,
        "loss_mask selects no position",
    ),
    "mask-wrong-shape": (
        None,
        lambda m: m[:, :11],
        ValueError,
        re.escape("shape [24, 12], got torch.bool [24, 11]"),
    ),
    "mask-not-bool": (None, lambda m: m.long(), ValueError, "got torch.int64"),
    "mask-on-meta-device": (None, lambda m: m.to("meta"), ValueError, "loss_mask .*meta device"),
}


@pytest.mark.parametrize("case", list(FIT_DATA_CASES))
def test_fit_rejects_data(case, model, data, intact):
    make_tokens, make_mask, exc, match = FIT_DATA_CASES[case]
    tokens, mask = data
    bad_tokens = make_tokens(tokens) if make_tokens else tokens
    bad_mask = make_mask(mask) if make_mask else mask
    with attach(model, tokens) as noise:
        before = noise_state(noise)
        with pytest.raises(exc, match=match):
            fit(model, noise, bad_tokens, loss_mask=bad_mask, steps=2, quiet=True)
        assert_same_state(noise_state(noise), before)


def test_fit_rejects_a_model_that_is_not_transformer_lens(model, data, intact):
    with attach(model, data[0]) as noise:
        with pytest.raises(TypeError, match="got Linear"):
            fit(torch.nn.Linear(2, 2), noise, data[0], quiet=True)
        with pytest.raises(TypeError, match="noise must be NoiseHooks.*got dict"):
            fit(model, {}, data[0], quiet=True)


def test_noise_on_another_device_than_its_hook(model, data, intact):
    tokens, mask = data
    with attach(model, tokens) as noise:
        noise.to("meta")  # a device the activations are not on
        with pytest.raises(ValueError, match="is on meta but the activation there is on cpu"):
            model(tokens)
        with pytest.raises(ValueError, match="is on meta but the activation there is on cpu"):
            fit(model, noise, tokens, loss_mask=mask, steps=1, quiet=True)


def test_float64_noise_on_a_float32_model_is_cast(model, data, intact):
    # a dtype mismatch between noise and activations is not an error: the noise is cast
    tokens = data[0]
    with attach(model, tokens, seed=1) as noise:
        expected = logits_of(model, tokens)
        noise.double()
        noise.manual_seed(1)
        out = logits_of(model, tokens)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected)


# ------------------------------------------------------------------ fit: NaN / inf on the way
def test_nan_embedding_stops_fit_at_the_step_and_keeps_last_good_checkpoint(
    make_model, data, tmp_path
):
    tokens, mask = data
    tokens = torch.where(tokens == 7, torch.full_like(tokens, 8), tokens)  # no token 7 yet
    first = {}  # example -> first step whose batch holds it
    for step in range(12):
        for e in batch_indices(24, 4, 0, step).tolist():
            first.setdefault(e, step)
    example = next(e for e in range(24) if 3 <= first.get(e, -1) <= 9)
    bad_step = first[example]
    poisoned_tokens = tokens.clone()
    poisoned_tokens[example, 2] = 7

    clean = make_model()
    poisoned = make_model()
    with torch.no_grad():
        embedding_weight(poisoned)[7] = NAN
    before = logits_of(poisoned, poisoned_tokens)
    kwargs = dict(loss_mask=mask, batch_size=4, seed=0, lr=0.05, checkpoint_every=2, quiet=True)

    with tn.attach_noise(poisoned, HOOKS, calibration_tokens=tokens) as noise:
        with pytest.raises(FloatingPointError, match=f"non-finite loss at step {bad_step} "):
            fit(poisoned, noise, poisoned_tokens, steps=12, run_dir=tmp_path / "bad", **kwargs)
        after_failure = noise_state(noise)
    assert_model_intact(poisoned, poisoned_tokens, before)

    # the reference: the clean model fitted for exactly the steps that succeeded
    with tn.attach_noise(clean, HOOKS, calibration_tokens=tokens) as noise:
        fit(clean, noise, poisoned_tokens, steps=bad_step, run_dir=tmp_path / "good", **kwargs)
        assert_same_state(after_failure, noise_state(noise))  # left at the last finite step

    status = json.loads((tmp_path / "bad" / "status.json").read_text())
    assert status["state"] == "failed" and f"step {bad_step}" in status["message"]
    assert "last good checkpoint is kept" in status["message"]
    last_good = bad_step // 2 * 2
    step, folder = latest_checkpoint(tmp_path / "bad")
    assert step == last_good
    assert snapshot(folder) == snapshot(tmp_path / "good" / "checkpoints" / folder.name)
    history = read_history(tmp_path / "bad")
    assert [r["step"] for r in history] == list(range(last_good))


def test_infinite_loss_names_the_step(model, data, intact):
    tokens, mask = data
    calls = []

    def metric(logits, batch):
        calls.append(1)
        return logits[:, -1].mean() * 0 + (INF if len(calls) > 3 else 0.0)

    with attach(model, tokens) as noise:
        with pytest.raises(FloatingPointError, match=r"non-finite loss at step 3 \(task inf"):
            fit(model, noise, tokens, loss_mask=mask, objective=metric, steps=8, quiet=True)
        assert all(torch.isfinite(p).all() for p in noise.parameters())


def test_nan_noise_parameters_name_the_step(model, data, intact):
    tokens, mask = data
    with attach(model, tokens) as noise:
        with torch.no_grad():
            noise.layer("blocks.1.attn.hook_z").rhos[2] = NAN
        with pytest.raises(FloatingPointError, match=r"non-finite loss at step 0 .*noise nan"):
            fit(model, noise, tokens, loss_mask=mask, steps=3, quiet=True)


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


def _truncate(name, keep=0.5):
    def apply(path):
        data = (path / name).read_bytes()
        (path / name).write_bytes(data[: int(len(data) * keep)])

    return apply


def _flip_last_byte(path):
    file = path / "noise_state.safetensors"
    data = bytearray(file.read_bytes())
    data[-1] ^= 0x55  # inside the tensor data: a valid file whose checksum no longer matches
    file.write_bytes(bytes(data))


STATE, CONFIG = "noise_state.safetensors", "noise_config.json"
LOAD_CASES = {
    "truncated-state": (_truncate(STATE), r"noise_state.safetensors' is truncated or corrupt"),
    "empty-state": (_truncate(STATE, 0), r"noise_state.safetensors' is truncated or corrupt"),
    "corrupted-state": (_flip_last_byte, r"noise_state.safetensors' does not match .*checksum"),
    "missing-state": (lambda p: (p / STATE).unlink(), "noise_state.safetensors' does not exist"),
    "missing-config": (lambda p: (p / CONFIG).unlink(), "noise_config.json' does not exist"),
    "truncated-config": (_truncate(CONFIG), "noise_config.json' is not valid JSON"),
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
    "config-granularity-disagrees-with-state": (
        _edit_config(lambda c: c["hooks"]["blocks.1.attn.hook_z"].update(granularity="feature")),
        re.escape("'layers.blocks__1__attn__hook_z.rhos' has shape [4], expected [4, 8]"),
    ),
}


@pytest.mark.parametrize("case", list(LOAD_CASES))
def test_loading_damaged_noise(case, model, data, intact, saved_noise, tmp_path):
    damage, match = LOAD_CASES[case]
    path = tmp_path / "noise"
    shutil.copytree(saved_noise, path)
    damage(path)
    before = snapshot(path)
    with pytest.raises(ValueError, match=match):
        NoiseHooks.load(path, model)
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


# -------------------------------------------------------------------------- run directories
def test_run_dir_under_a_regular_file(model, data, intact, tmp_path):
    tokens, mask = data
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder\n")
    for run_dir in (blocker / "run", blocker):
        with attach(model, tokens) as noise:
            before = noise_state(noise)
            with pytest.raises(ValueError, match=f"run_dir {re.escape(repr(str(run_dir)))} is not"):
                fit(model, noise, tokens, loss_mask=mask, steps=2, run_dir=run_dir, **FIT)
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
def test_resume_with_a_different_config(case, model, data, run_copy, make_model):
    fit_kw, attach_kw, model_kw, match = RESUME_CASES[case]
    tokens, mask = data
    if fit_kw == "fewer":
        fit_kw, tokens, mask = {}, tokens[:20], mask[:20]
    m = make_model(**model_kw) if model_kw else model
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
        _truncate("checkpoints/step_0000004/noise_state.safetensors"),
        "step_0000004/noise_state.safetensors' is truncated or corrupt",
    ),
    "corrupted-optimizer-state": (
        _truncate("checkpoints/step_0000004/optimizer_state.safetensors", 0.3),
        "step_0000004/optimizer_state.safetensors' is truncated or corrupt",
    ),
    "missing-trainer-state": (
        lambda r: (r / "checkpoints/step_0000004/trainer_state.json").unlink(),
        "trainer state .*step_0000004/trainer_state.json' does not exist",
    ),
    "malformed-run-config": (
        _truncate("config.json"),
        "run config .*config.json' is not valid JSON",
    ),
    "new-run-into-a-finished-one": (None, "already holds a run; pass resume=True"),
}


@pytest.mark.parametrize("case", list(RUN_DAMAGE))
def test_damaged_run_directory(case, model, data, intact, run_copy):
    damage, match = RUN_DAMAGE[case]
    tokens, mask = data
    if damage:
        damage(run_copy)
    before = snapshot(run_copy)
    with attach(model, tokens) as noise:
        state = noise_state(noise)
        with pytest.raises(ValueError, match=match):
            fit(model, noise, tokens, loss_mask=mask, steps=8, run_dir=run_copy,
                resume=damage is not None, **FIT)  # fmt: skip
        assert_same_state(noise_state(noise), state)
    assert snapshot(run_copy) == before


# ------------------------------------------------------------------------------ a full disk
@pytest.mark.parametrize("failing", [STATE, CONFIG])
def test_full_disk_while_saving_over_saved_noise(
    failing, model, data, intact, saved_noise, disk, tmp_path
):
    path = tmp_path / "noise"
    shutil.copytree(saved_noise, path)
    before = snapshot(path)
    disk.fill(failing)
    with attach(model, data[0]) as noise:
        with pytest.raises(OSError, match=f"{re.escape(failing)}'.*{ENOSPC}") as info:
            noise.save(path)
    assert info.value.errno == errno.ENOSPC and disk.failed
    assert snapshot(path) == before  # no temporary file left either
    disk.free()
    NoiseHooks.load(path, model).remove()


def test_full_disk_during_a_checkpoint_then_resume(
    model, data, intact, run_copy, disk, uninterrupted_8
):
    tokens, mask = data
    kept = {p: snapshot(run_copy / p) for p in ("checkpoints", "final")}
    history = (run_copy / "history.jsonl").read_bytes()
    disk.fill("step_0000006")
    with attach(model, tokens) as noise:
        with pytest.raises(OSError, match=f"step_0000006/{STATE}'.*{ENOSPC}"):
            fit(model, noise, tokens, loss_mask=mask, steps=8, run_dir=run_copy, resume=True,
                **FIT)  # fmt: skip
    assert disk.failed and all("step_0000006" in p for p in disk.failed)
    now = snapshot(run_copy / "checkpoints")
    assert {k: v for k, v in now.items() if not k.startswith(".tmp_")} == kept["checkpoints"]
    assert snapshot(run_copy / "final") == kept["final"]
    assert latest_checkpoint(run_copy)[0] == 4
    lines = (run_copy / "history.jsonl").read_bytes()
    assert lines.startswith(history)
    assert [json.loads(x)["step"] for x in lines.splitlines()] == list(range(6))

    disk.free()  # space again: the run resumes past the stray .tmp_step_0000006 folder
    with attach(model, tokens) as noise:
        fit(model, noise, tokens, loss_mask=mask, steps=8, run_dir=run_copy, resume=True, **FIT)
    assert_same_state(tio.read_tensors(run_copy / "final" / STATE), uninterrupted_8)
    assert [r["step"] for r in read_history(run_copy)] == list(range(8))


def test_full_disk_while_appending_history(model, data, intact, run_copy, disk):
    tokens, mask = data
    history = (run_copy / "history.jsonl").read_bytes()
    checkpoints = snapshot(run_copy / "checkpoints")
    disk.fill("history.jsonl", skip=1)  # the resume's own rewrite succeeds; the append fails
    with attach(model, tokens) as noise:
        with pytest.raises(OSError, match=f"history.jsonl'.*{ENOSPC}"):
            fit(model, noise, tokens, loss_mask=mask, steps=8, run_dir=run_copy, resume=True,
                **FIT)  # fmt: skip
    assert (run_copy / "history.jsonl").read_bytes() == history  # the half line was cut off
    assert snapshot(run_copy / "checkpoints") == checkpoints
