"""Indirect object identification (Wang et al., 2022, https://arxiv.org/abs/2211.00593).

"When Mary and John went to the store, John gave a drink to" -> " Mary". The metric is the logit
difference between the indirect object (IO, the answer) and the subject (S, the distractor) at
the final position. Templates and name lists ship with the package; prompts are generated
offline for any tokenizer, keeping names, places and objects that are a single token.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from tl_noise.tasks.base import Batch, Task
from tl_noise.tasks.text import bos_ids, encode, resolve_tokenizer, single_token

NAMES = (
    "Mary John Tom James Dan Sid Alan Paul Kate Amy Lisa Anna Sarah Rose Emma Jack Ben Sam "
    "Max Adam Luke Mark Eric Ryan Kevin Laura Claire Grace Alice Jane"
).split()
PLACES = "store garden restaurant school hospital office station house park beach".split()
OBJECTS = "drink ring kiss bone basketball computer necklace snack apple book".split()
TEMPLATES = (
    "When {A} and {B} went to the {PLACE} , {B} gave a {OBJECT} to",
    "When {A} and {B} got a {OBJECT} at the {PLACE} , {B} decided to give it to",
    "After {A} and {B} went to the {PLACE} , {B} gave a {OBJECT} to",
    "While {A} and {B} were working at the {PLACE} , {B} gave a {OBJECT} to",
    "Then , {A} and {B} had a long argument , and afterwards {B} said to",
    "When {A} and {B} were at the {PLACE} , {B} gave a {OBJECT} to",
    "When {A} and {B} got to the {PLACE} , {B} gave a {OBJECT} to",
)


def word_vocabulary() -> list[str]:
    """Every word the templates can produce (for building a word-level test tokenizer)."""
    words: list[str] = []
    for template in TEMPLATES:
        words += [w for w in template.split() if not w.startswith("{")]
    words += NAMES + PLACES + OBJECTS
    return list(dict.fromkeys(words))


def ioi_metric(logits: Float[Tensor, "b pos d_vocab"], batch: Batch) -> Float[Tensor, ""]:
    """Negative logit difference ``-(logit[IO] - logit[S])`` at ``metric_positions``, averaged.

    Lower is better: a model that prefers the indirect object to the subject scores below 0.
    """
    rows = torch.arange(logits.shape[0], device=logits.device)
    final = logits[rows, batch["metric_positions"].to(logits.device)].float()
    answer = final.gather(-1, batch["answers"].to(logits.device)[:, None])
    distractor = final.gather(-1, batch["distractors"].to(logits.device)[:, None])
    return -(answer - distractor).mean()


def ioi_task(
    tokenizer_or_model: Any, n: int = 128, seed: int = 0, prepend_bos: bool = True
) -> Task:
    """``n`` IOI prompts of one token length, answer = IO name, distractor = S name.

    Each prompt fills a template with two distinct random names (``A`` = IO, ``B`` = S), a place
    and an object, keeping only words that are a single token for this tokenizer. Exactly
    ``n // 2`` prompts swap the first clause to ``"B and A"``, so the IO's position gives nothing
    away. Only templates of the most common token length are used (ties: the earliest template),
    so ``tokens`` is ``[n, pos]`` without padding. Tokenizers that handle ``"store, John"`` get
    natural punctuation; word-level ones get the templates' spaced ``"store , John"``.

    ``loss_mask`` is True only at the final position; extras ``answers``, ``distractors`` (token
    ids of the names as the next token, e.g. ``" Mary"``) and ``metric_positions`` are ``[n]``.
    The metric is :func:`ioi_metric`.
    """
    if n < 1:
        raise ValueError(f"n={n}; expected >= 1")
    tokenizer = resolve_tokenizer(tokenizer_or_model)
    prefix = bos_ids(tokenizer, prepend_bos)
    names = _single_tokens(tokenizer, "When", NAMES, "names", minimum=2)
    places = _single_tokens(tokenizer, "the", PLACES, "places", minimum=1)
    objects = _single_tokens(tokenizer, "a", OBJECTS, "objects", minimum=1)

    probe = _render(TEMPLATES[0], names[0], names[1], places[0], objects[0], punctuate=True)
    punctuate = tokenizer.decode(encode(tokenizer, probe)) == probe
    lengths = [
        len(encode(tokenizer, _render(t, names[0], names[1], places[0], objects[0], punctuate)))
        for t in TEMPLATES
    ]
    length = max(lengths, key=lambda x: (lengths.count(x), -lengths.index(x)))
    group = [t for t, size in zip(TEMPLATES, lengths, strict=True) if size == length]

    gen = torch.Generator().manual_seed(seed)
    swapped = (torch.randperm(n, generator=gen) < n // 2).tolist()

    def pick(options: list[str]) -> str:
        return options[int(torch.randint(len(options), (), generator=gen))]

    prompts: list[str] = []
    rows: list[list[int]] = []
    answers: list[int] = []
    distractors: list[int] = []
    for _ in range(10 * n + 100):
        if len(prompts) == n:
            break
        io, s = (names[int(i)] for i in torch.randperm(len(names), generator=gen)[:2])
        template = pick(group)
        if swapped[len(prompts)]:
            template = template.replace("{A} and {B}", "{B} and {A}", 1)
        prompt = _render(template, io, s, pick(places), pick(objects), punctuate)
        ids = encode(tokenizer, prompt)
        answer, distractor = single_token(tokenizer, prompt, io), single_token(tokenizer, prompt, s)
        if len(ids) != length or answer is None or distractor is None:
            continue  # this tokenizer merges some word with its context; draw another
        prompts.append(prompt)
        rows.append(prefix + ids)
        answers.append(answer)
        distractors.append(distractor)
    if len(prompts) < n:
        raise ValueError(
            f"only {len(prompts)} of n={n} IOI prompts tokenize to {length} tokens "
            "with single-token names; this tokenizer splits words inconsistently"
        )

    tokens = torch.tensor(rows, dtype=torch.long)
    loss_mask = torch.zeros_like(tokens, dtype=torch.bool)
    loss_mask[:, -1] = True
    extras = {
        "answers": torch.tensor(answers, dtype=torch.long),
        "distractors": torch.tensor(distractors, dtype=torch.long),
        "metric_positions": torch.full((n,), tokens.shape[1] - 1, dtype=torch.long),
    }
    info = {"n": n, "seed": seed, "prepend_bos": prepend_bos, "templates": group,
            "names": names, "places": places, "objects": objects, "prompts": prompts}  # fmt: skip
    return Task("ioi", tokens, loss_mask, metric=ioi_metric, extras=extras, info=info)


def _render(template: str, io: str, s: str, place: str, obj: str, punctuate: bool) -> str:
    text = template.format(A=io, B=s, PLACE=place, OBJECT=obj)
    return text.replace(" , ", ", ") if punctuate else text


def _single_tokens(
    tokenizer: Any, prefix: str, words: list[str], what: str, minimum: int
) -> list[str]:
    kept = [w for w in words if single_token(tokenizer, prefix, w) is not None]
    if len(kept) < minimum:
        raise ValueError(
            f"IOI needs at least {minimum} {what} that are a single token after {prefix!r}; "
            f"this tokenizer has {len(kept)} of {len(words)} ({kept})"
        )
    return kept
