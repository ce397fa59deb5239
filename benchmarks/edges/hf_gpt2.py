"""A tiny GPT-2 booted from a Hugging Face checkpoint, where TransformerLens 4.3's own edge
attribution patching runs (it refuses natively booted bridges).

:func:`trained_gpt2` builds a ``GPT2LMHeadModel`` (2 layers x 4 heads, d_model 64, vocab 64,
48 positions, layer norms, no dropout), trains it for ``steps`` Adam steps on the embedded
induction benchmark's task (repeated random token spans, loss at the repeated positions), saves
it with ``save_pretrained`` (model and a word-level tokenizer) to a temporary directory and
boots it with :func:`tl_noise.models.load_model` (``TransformerBridge.boot_transformers``).
Nothing is downloaded. A few hundred steps give a partly formed induction circuit (the loss
falls from ln 64 = 4.16 to about 3): a model with a behaviour to explain, not a finished one.
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

import torch

from tl_noise.models import load_model
from tl_noise.tasks.base import Task
from tl_noise.zoo import load_benchmark

CONFIG = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=64, n_positions=48)


def _tokenizer(vocab_size: int) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, **{f"t{i}": i for i in range(1, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    special = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=special, eos_token=special,
                                   unk_token=special, pad_token=special)  # fmt: skip


def trained_gpt2(steps: int = 800, seed: int = 0) -> tuple[Any, Any, dict[str, Any]]:
    """``(bridge, task generator, info)``: the trained model booted from its checkpoint, the
    induction benchmark whose ``task(n, seed)`` and ``corrupted_tokens(task)`` it was trained on,
    and the training losses."""
    from transformers import GPT2Config, GPT2LMHeadModel

    bench = load_benchmark("induction")
    config = GPT2Config(**CONFIG, bos_token_id=0, eos_token_id=0, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    began, losses = time.perf_counter(), []
    for step in range(steps):
        task: Task = bench.task(32, seed=10_000 + step)
        x, mask = task.tokens, task.loss_mask[:, :-1]
        logp = model(x).logits[:, :-1].log_softmax(-1).gather(-1, x[:, 1:, None])[..., 0]
        loss = -logp[mask].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    info = {"config": CONFIG, "steps": steps, "train_seconds": time.perf_counter() - began,
            "first_loss": losses[0] if losses else None,
            "last_loss": sum(losses[-50:]) / max(1, len(losses[-50:]))}  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        _tokenizer(CONFIG["vocab_size"]).save_pretrained(folder)
        bridge = load_model(folder)
    bridge.eval()
    for p in bridge.parameters():
        p.requires_grad_(False)
    return bridge, bench, info
