"""Shared fixtures: small real TransformerLens models built offline, for both major versions."""

from __future__ import annotations

import os

import pytest
import torch

from tl_noise.models import build_native_model, transformer_lens_major

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

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


def pytest_report_header(config: pytest.Config) -> str:
    import importlib.metadata as md

    return f"transformer-lens {md.version('transformer-lens')}, torch {torch.__version__}"


@pytest.fixture(scope="session")
def tiny_model():
    """A 2-layer model with MLPs (native TransformerLens config), frozen."""
    model = build_native_model(TINY)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture(scope="session")
def make_model():
    """Factory: ``make_model(**overrides)`` builds a fresh native model from TINY + overrides."""

    def make(**overrides):
        return build_native_model({**TINY, **overrides})

    return make


@pytest.fixture(scope="session")
def tokens():
    return torch.randint(0, TINY["d_vocab"], (6, 12), generator=torch.Generator().manual_seed(1))


def save_tiny_gpt2_checkpoint(path, n_layer: int = 2, n_embd: int = 32, n_head: int = 4) -> str:
    """Write a small GPT-2 model + word-level tokenizer with ``save_pretrained`` (offline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from tl_noise.tasks.ioi import word_vocabulary

    vocab = {"<|endoftext|>": 0}
    for word in word_vocabulary():
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    config = GPT2Config(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        vocab_size=len(vocab),
        n_positions=64,
        n_ctx=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(path)
    hf_tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def gpt2_checkpoint(tmp_path_factory):
    return save_tiny_gpt2_checkpoint(tmp_path_factory.mktemp("gpt2-tiny"))
