"""Plain-text language modelling, and the tokenizer helpers the prompt tasks share.

:func:`text_task` cuts a UTF-8 file into fixed-length windows scored by next-token cross-entropy.
The helpers accept a Hugging Face tokenizer, a ``tokenizers.Tokenizer`` or a TransformerLens
model (whose ``model.tokenizer`` is used), and never add special tokens behind the caller's back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tl_noise.tasks.base import Batch, Task


def resolve_tokenizer(tokenizer_or_model: Any) -> Any:
    """The tokenizer of a TransformerLens model (``model.tokenizer``), or the tokenizer itself."""
    obj = tokenizer_or_model
    if hasattr(obj, "cfg") and hasattr(obj, "tokenizer"):
        if obj.tokenizer is None:
            raise ValueError(
                f"the model {type(obj).__name__} has no tokenizer (models built from a config "
                "have none); pass a tokenizer instead"
            )
        obj = obj.tokenizer
    if not (callable(getattr(obj, "encode", None)) and callable(getattr(obj, "decode", None))):
        raise TypeError(
            f"expected a tokenizer (with encode/decode) or a TransformerLens model with a "
            f"tokenizer, got {type(tokenizer_or_model).__name__}"
        )
    return obj


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (no BOS/EOS added by the tokenizer)."""
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):  # its encode returns an Encoding
        return list(tokenizer.encode(text, add_special_tokens=False).ids)
    # verbose=False: a long text file must not warn about the model's maximum length
    return list(tokenizer.encode(text, add_special_tokens=False, verbose=False))


def bos_ids(tokenizer: Any, prepend_bos: bool) -> list[int]:
    """``[bos_token_id]`` when ``prepend_bos``, else ``[]``; ValueError if there is no BOS."""
    if not prepend_bos:
        return []
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        raise ValueError(
            f"prepend_bos=True but the tokenizer {type(tokenizer).__name__} has no bos_token_id; "
            "pass prepend_bos=False"
        )
    return [int(bos)]


def single_token(tokenizer: Any, prefix: str, word: str) -> int | None:
    """Id of ``word`` as the one token that follows ``prefix + " "``, or None.

    None when ``word`` takes more than one token in that context, changes how ``prefix`` is
    tokenized, or does not decode back to itself (e.g. an unknown word mapped to ``<unk>``).
    Works for BPE (``" Mary"`` -> ``"ĠMary"``), SentencePiece and word-level tokenizers.
    """
    head = encode(tokenizer, prefix)
    full = encode(tokenizer, f"{prefix} {word}")
    if len(full) != len(head) + 1 or full[: len(head)] != head:
        return None
    return full[-1] if tokenizer.decode([full[-1]]).strip() == word else None


def next_token_cross_entropy(
    logits: Float[Tensor, "b pos d_vocab"],
    tokens: Int[Tensor, "b pos"],
    mask: Bool[Tensor, "b pos"],
) -> Float[Tensor, ""]:
    """Mean cross-entropy ``-log p(tokens[:, t + 1] | logits[:, t])`` over the ``t`` with ``mask``.

    The mask at the last position is ignored (nothing follows it); an empty mask gives 0.
    """
    tokens, mask = tokens.to(logits.device), mask.to(logits.device)
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    keep = mask[:, :-1].float()
    return (nll * keep).sum() / keep.sum().clamp_min(1.0)


def text_metric(logits: Float[Tensor, "b pos d_vocab"], batch: Batch) -> Float[Tensor, ""]:
    """Task metric: next-token cross-entropy over ``batch["loss_mask"]`` (lower is better)."""
    return next_token_cross_entropy(logits, batch["tokens"], batch["loss_mask"])


def text_task(
    path: str | Path,
    tokenizer_or_model: Any,
    seq_len: int = 64,
    max_sequences: int | None = None,
    prepend_bos: bool = True,
    seed: int | None = None,
) -> Task:
    """Language modelling on a text file: non-overlapping windows of ``seq_len`` tokens.

    The whole file is tokenized once and cut into windows of ``seq_len - 1`` text tokens behind a
    BOS (``prepend_bos``) or ``seq_len`` text tokens (without); the ragged tail is dropped, so
    ``tokens`` is ``[n, seq_len]``. Windows keep the file's order, or with a ``seed`` a seeded
    random order (then ``max_sequences`` samples the whole file rather than its beginning).
    ``loss_mask`` is True everywhere but the last position, and the metric is the mean
    next-token cross-entropy over it.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"text file {str(path)!r} does not exist")
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len}; expected >= 2 (one prediction needs two tokens)")
    if max_sequences is not None and max_sequences < 1:
        raise ValueError(f"max_sequences={max_sequences}; expected None or >= 1")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"text file {str(path)!r} is empty")
    tokenizer = resolve_tokenizer(tokenizer_or_model)
    prefix = bos_ids(tokenizer, prepend_bos)
    ids = torch.tensor(encode(tokenizer, text), dtype=torch.long)
    window = seq_len - len(prefix)
    n = len(ids) // window
    if n == 0:
        raise ValueError(
            f"text file {str(path)!r} has {len(ids)} tokens; one window of seq_len={seq_len} "
            f"needs {window}"
        )
    body = ids[: n * window].reshape(n, window)
    if seed is not None:
        body = body[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]
    body = body[:max_sequences]
    n = body.shape[0]
    tokens = torch.cat([torch.tensor(prefix, dtype=torch.long).expand(n, -1), body], dim=1)
    loss_mask = torch.ones_like(tokens, dtype=torch.bool)
    loss_mask[:, -1] = False
    info = {"path": str(path), "seq_len": seq_len, "max_sequences": max_sequences,
            "prepend_bos": prepend_bos, "seed": seed, "n_text_tokens": len(ids)}  # fmt: skip
    return Task("text", tokens, loss_mask, metric=text_metric, info=info)
