"""Shared fixtures and factories: small real TransformerLens models built offline (the 4.x native
bridge or a 3.x ``HookedTransformer``, whichever is installed), their data, the embedded induction
model with its task and a short fit, and the checks that a model or a folder was left as it was.

The plain functions and constants here are the one definition of each; the fixtures wrap them.
Test modules and the worker scripts in ``tests/helpers/`` import them with ``from conftest import
...`` (``tests/`` is on ``sys.path``: pytest puts it there for this file, the workers themselves).
Keep this the only ``conftest.py`` under ``tests/``: a second one would also be imported as the
module ``conftest`` and shadow this one for those imports.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import tl_noise as tn  # noqa: E402
from tl_noise.fitting import fit  # noqa: E402
from tl_noise.models import (  # noqa: E402
    build_native_model,
    load_embedded_model,
    transformer_lens_major,
)
from tl_noise.tasks import induction_task  # noqa: E402

TL_MAJOR = transformer_lens_major()
torch.set_num_threads(1)  # tiny models: threads only add overhead on a shared 2-core machine

TINY = dict(
    n_layers=2,
    d_model=32,
    n_heads=4,
    d_head=8,
    d_vocab=50,
    n_ctx=24,
    d_mlp=64,
    act_fn="gelu",
    seed=0,
)
HOOKS = "blocks.*.attn.hook_z"  # the per-head hook point most tests put noise on
EMBEDDED_HOOKS = ["blocks.*.attn.hook_z", "blocks.*.hook_resid_pre"]
NAN, INF = float("nan"), float("inf")


def pytest_report_header(config: pytest.Config) -> str:
    import importlib.metadata as md

    return f"transformer-lens {md.version('transformer-lens')}, torch {torch.__version__}"


# ------------------------------------------------------------------------- models and data
def freeze(model):
    """``model`` in eval mode with no parameter requiring grad (as tl-noise expects it)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def tiny_data(mask_from: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """24 x 12 random tokens of the TINY vocabulary (seed 0; the range is exactly [0, 49]) and a
    loss mask selecting the positions from ``mask_from`` on."""
    tokens = torch.randint(0, 50, (24, 12), generator=torch.Generator().manual_seed(0))
    tokens[0, :2] = torch.tensor([0, 49])  # the range is exactly [0, 49]
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, mask_from:] = True
    return tokens, mask


def embedded_induction(n: int = 32, seed: int = 0):
    """A fresh copy of the embedded induction model and an induction task for it."""
    model = load_embedded_model()
    cfg = model.cfg
    task = induction_task(int(cfg.d_vocab), n=n, seq_len=int(cfg.n_ctx), seed=seed, bos=0)
    return model, task  # the embedded model was trained with BOS = 0


def fit_embedded(
    run_dir: Path,
    *,
    steps: int,
    checkpoint_every: int,
    mode: str = "alphaless",
    seed: int = 0,
    n: int = 32,
    **kwargs,
):
    """A short fit on the embedded model, with noise on the heads and the residual stream,
    written to ``run_dir``; returns ``(model, task)`` (the noise is removed again)."""
    model, task = embedded_induction(n=n, seed=seed)
    noise = tn.attach_noise(model, EMBEDDED_HOOKS, calibration_tokens=task.tokens)
    try:
        fit(
            model,
            noise,
            task,
            mode=mode,
            steps=steps,
            lr=0.1,
            batch_size=16,
            seed=seed,
            run_dir=run_dir,
            quiet=True,
            checkpoint_every=checkpoint_every,
            **kwargs,
        )
    finally:
        noise.remove()
    return model, task


@pytest.fixture(scope="session")
def tiny_model():
    """A 2-layer model with MLPs (native TransformerLens config), frozen; shared: leave it as
    you found it (the bad-input tests check that with ``intact``)."""
    return freeze(build_native_model(TINY))


@pytest.fixture(scope="session")
def make_model():
    """Factory: ``make_model(**overrides)`` builds a fresh native model from TINY + overrides."""

    def make(**overrides):
        return build_native_model({**TINY, **overrides})

    return make


@pytest.fixture(scope="session")
def tokens():
    return torch.randint(0, TINY["d_vocab"], (6, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def data():
    """``(tokens, loss_mask)`` of :func:`tiny_data` (shared: clone before changing them)."""
    return tiny_data()


@pytest.fixture(scope="session")
def embedded():
    """Factory: ``embedded(n=32, seed=0)`` -> a fresh embedded model and an induction task."""
    return embedded_induction


@pytest.fixture(scope="session")
def embedded_fit():
    """Factory: ``embedded_fit(run_dir, steps=..., checkpoint_every=..., mode=..., seed=...)``
    fits the embedded model into ``run_dir`` (see :func:`fit_embedded`)."""
    return fit_embedded


def save_word_tokenizer(path) -> int:
    """Write a word-level tokenizer with ``save_pretrained`` (offline); returns its size."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tl_noise.tasks.ioi import word_vocabulary

    vocab = {"<|endoftext|>": 0}
    for word in word_vocabulary():
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    special = "<|endoftext|>"
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=special, eos_token=special,
                                     unk_token=special, pad_token=special)  # fmt: skip
    hf_tok.save_pretrained(path)
    return len(vocab)


def save_tiny_checkpoint(path, config_class: Any, model_class: Any, **config: Any) -> str:
    """A small Hugging Face model of any architecture (``config_class(**config)``, random weights,
    seed 0) + word-level tokenizer written with ``save_pretrained`` to ``path`` (offline)."""
    vocab = save_word_tokenizer(path)
    ids = dict(vocab_size=vocab, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    model_class(config_class(**config, **ids)).eval().save_pretrained(path)
    return str(path)


def save_tiny_gpt2_checkpoint(path, n_layer: int = 2, n_embd: int = 32, n_head: int = 4) -> str:
    """Write a small GPT-2 model + word-level tokenizer with ``save_pretrained`` (offline)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    return save_tiny_checkpoint(path, GPT2Config, GPT2LMHeadModel, n_layer=n_layer,
                                n_embd=n_embd, n_head=n_head, n_positions=64, n_ctx=64)  # fmt: skip


@pytest.fixture(scope="session")
def gpt2_checkpoint(tmp_path_factory):
    return save_tiny_gpt2_checkpoint(tmp_path_factory.mktemp("gpt2-tiny"))


# ------------------------------------------------------------ checks: nothing changed or lost
def count_hooks(model) -> int:
    """Forward hooks on the model's hook points (TransformerLens' list + torch's registry)."""
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


def embedding_weight(model) -> torch.nn.Parameter:
    """The token embedding matrix ``[d_vocab, d_model]`` (to poison a token with NaN)."""
    d_vocab, d_model = model.cfg.d_vocab, model.cfg.d_model
    return next(
        p for n, p in model.named_parameters() if "embed" in n and p.shape == (d_vocab, d_model)
    )


def noise_state(noise) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in noise.state_dict().items()}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(bits(a[key]), bits(b[key])), key


# ------------------------------------------------ the bad-input matrix (tests/test_bad_input_*)
# Every case raises a clear error naming the offending value, and nothing is lost: files that
# existed before (a saved noise directory, a run directory with checkpoints) are byte-identical
# afterwards, the noise a failed call was given keeps its state, and a model involved has no
# tl-noise hooks left and computes bit-identical outputs.
STATE, CONFIG = "noise_state.safetensors", "noise_config.json"  # the files of saved noise
BAD_INPUT_FIT = dict(batch_size=8, lr=0.05, seed=3, quiet=True, checkpoint_every=2)


def attach(model, tokens, hooks=HOOKS, **kw):
    """``attach_noise`` calibrated on ``tokens`` (noise on every hook_z unless told otherwise)."""
    return tn.attach_noise(model, hooks, calibration_tokens=tokens, **kw)


def fit_bad_input_run(model, data, run: Path, steps: int) -> Path:
    """The matrix's standard run: noise on every hook_z, fitted ``steps`` steps into ``run``."""
    tokens, mask = data
    with attach(model, tokens) as noise:
        fit(model, noise, tokens, loss_mask=mask, steps=steps, run_dir=run, **BAD_INPUT_FIT)
    return run


def truncate(name: str, keep: float = 0.5):
    """Damage: cut the file ``name`` (relative to the folder given) to ``keep`` of its bytes."""

    def apply(path):
        data = (path / name).read_bytes()
        (path / name).write_bytes(data[: int(len(data) * keep)])

    return apply


@pytest.fixture(scope="session")
def tiny_logits(tiny_model, data):
    """The shared model's logits on ``data`` before any test touched it."""
    return logits_of(tiny_model, data[0])


@pytest.fixture()
def intact(tiny_model, data, tiny_logits):
    """Checks, before and after the test body, that the shared model is exactly as it was."""
    assert_model_intact(tiny_model, data[0], tiny_logits)
    yield
    assert_model_intact(tiny_model, data[0], tiny_logits)


@pytest.fixture(scope="session")
def saved_noise(tiny_model, data, tmp_path_factory):
    """A noise directory saved from trained-looking noise (perturbed rhos)."""
    path = tmp_path_factory.mktemp("saved") / "noise"
    with attach(tiny_model, data[0]) as noise:
        with torch.no_grad():
            for p in noise.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
        noise.save(path)
    return path


@pytest.fixture(scope="session")
def base_run(tiny_model, data, tmp_path_factory):
    """A completed 4-step run (checkpoints at steps 2 and 4)."""
    return fit_bad_input_run(tiny_model, data, tmp_path_factory.mktemp("runs") / "base", 4)


@pytest.fixture()
def run_copy(base_run, tmp_path):
    """A copy of :func:`base_run` of the test's own."""
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    return run
