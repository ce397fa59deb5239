"""Greater-than (Hanna et al., 2023, https://arxiv.org/abs/2305.00586).

"The war lasted from the year 1732 to the year 17" -> a two-digit year above 32. The metric is the
probability difference: next-token probability mass on the years ``"00".."99"`` greater than
``YY`` minus the mass on those ``<= YY``. It needs a tokenizer that writes ``"1732"`` as
``"17" + "32"`` with every two-digit year one token, as GPT-2's BPE does.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_noise.tasks.base import Batch, Metric, Task
from tl_noise.tasks.text import bos_ids, encode, resolve_tokenizer, single_token

NOUNS = (
    "war deal contract treaty siege journey trial project rebellion expedition reign "
    "occupation marriage voyage campaign dispute"
).split()
YEARS = range(2, 99)  # YY in 02..98, so both sides of the comparison are non-empty

PromptTokenizer = Callable[[str, int], list[int] | None]
"""``(noun, yy) -> prompt ids``, or None when the prompt does not split the year as needed."""


def year_token_ids(tokenizer_or_model: Any) -> Int[Tensor, "100"]:
    """Token ids of ``"00", "01", ..., "99"`` (index ``k`` = year ``k``), one token each.

    ValueError naming the years that are not a single token that decodes back to itself.
    """
    tokenizer = resolve_tokenizer(tokenizer_or_model)
    ids, bad = [], []
    for k in range(100):
        year = f"{k:02d}"
        encoded = encode(tokenizer, year)
        if len(encoded) != 1 or tokenizer.decode(encoded).strip() != year:
            bad.append(f"{year!r} -> {encoded}")
        ids.append(encoded[0] if encoded else -1)
    if bad:
        raise ValueError(
            "greater_than_task needs every two-digit year '00'..'99' to be a single token (as in "
            f"GPT-2's BPE); this tokenizer fails for {len(bad)} of them: {', '.join(bad[:5])}"
            f"{' ...' if len(bad) > 5 else ''}"
        )
    return torch.tensor(ids, dtype=torch.long)


def probability_difference_metric(year_ids: Int[Tensor, "100"]) -> Metric:
    """Metric ``-(sum_{y > YY} p(y) - sum_{y <= YY} p(y))``, averaged over the batch.

    ``p`` is the softmax of ``logits[i, metric_positions[i]]`` over the whole vocabulary, read at
    ``year_ids``; ``YY`` is ``batch["yy"]``. Ranges over [-1, 1]; lower is better, -1 meaning all
    probability on later years.
    """

    def metric(logits: Float[Tensor, "b pos d_vocab"], batch: Batch) -> Float[Tensor, ""]:
        rows = torch.arange(logits.shape[0], device=logits.device)
        final = logits[rows, batch["metric_positions"].to(logits.device)].float()
        probs = final.softmax(-1)[:, year_ids.to(logits.device)]
        years = torch.arange(100, device=logits.device)
        later = years[None, :] > batch["yy"].to(logits.device)[:, None]
        difference = (probs * later).sum(-1) - (probs * ~later).sum(-1)
        return -difference.mean()

    return metric


def greater_than_task(
    tokenizer_or_model: Any,
    n: int = 128,
    seed: int = 0,
    century: int = 17,
    prepend_bos: bool = True,
) -> Task:
    """``n`` prompts ``"The {noun} lasted from the year {century}{YY} to the year {century}"``.

    ``noun`` is drawn from the :data:`NOUNS` that are one token, ``YY`` uniformly from the years
    in 02..98 that this tokenizer writes as ``"{century}" + "YY"`` (GPT-2 writes e.g. 1700 as one
    token; such years are skipped). ``loss_mask`` is True only at the final position; extras are
    ``yy`` and ``metric_positions`` (``[n]``); ``info["year_token_ids"]`` lists the 100 year ids
    the metric (:func:`probability_difference_metric`) reads.
    """
    if n < 1:
        raise ValueError(f"n={n}; expected >= 1")
    if not 10 <= century <= 99:
        raise ValueError(f"century={century}; expected a two-digit century prefix in [10, 99]")
    tokenizer = resolve_tokenizer(tokenizer_or_model)
    prefix = bos_ids(tokenizer, prepend_bos)
    year_ids = year_token_ids(tokenizer)
    nouns = [w for w in NOUNS if single_token(tokenizer, "The", w) is not None]
    if not nouns:
        raise ValueError(f"none of the nouns {NOUNS} is a single token after 'The'")
    tokenize: PromptTokenizer = partial(_prompt_ids, tokenizer, year_ids, century)
    years = _split_years(tokenizer, tokenize, nouns[0], century)
    length = len(tokenize(nouns[0], years[0]) or [])
    rows, yys, prompts = _draw_prompts(tokenize, nouns, years, length, n, seed, century)

    tokens = torch.tensor([prefix + ids for ids in rows], dtype=torch.long)
    loss_mask = torch.zeros_like(tokens, dtype=torch.bool)
    loss_mask[:, -1] = True
    extras = {
        "yy": torch.tensor(yys, dtype=torch.long),
        "metric_positions": torch.full((n,), tokens.shape[1] - 1, dtype=torch.long),
    }
    info = {"n": n, "seed": seed, "century": century, "prepend_bos": prepend_bos,
            "nouns": nouns, "years": years, "year_token_ids": year_ids.tolist(),
            "prompts": prompts}  # fmt: skip
    metric = probability_difference_metric(year_ids)
    return Task("greater_than", tokens, loss_mask, metric=metric, extras=extras, info=info)


def _prompt_ids(
    tokenizer: Any, year_ids: Int[Tensor, "100"], century: int, noun: str, yy: int
) -> list[int] | None:
    """Ids of the prompt for ``noun``, ``yy``; None unless it reads ``[..., century][YY][...]
    [century]`` and ``YY`` also follows it as one token."""
    head = f"The {noun} lasted from the year {century}"
    prompt = f"{head}{yy:02d} to the year {century}"
    head_ids, ids = encode(tokenizer, head), encode(tokenizer, prompt)
    year = int(year_ids[yy])
    if ids[: len(head_ids)] != head_ids or ids[len(head_ids) : len(head_ids) + 1] != [year]:
        return None
    return ids if encode(tokenizer, f"{prompt}{yy:02d}") == [*ids, year] else None


def _split_years(tokenizer: Any, tokenize: PromptTokenizer, noun: str, century: int) -> list[int]:
    """The years ``YY`` in :data:`YEARS` written ``"{century}" + "YY"``; ValueError if none is."""
    years = [yy for yy in YEARS if tokenize(noun, yy) is not None]
    if not years:
        example = [tokenizer.decode([i]) for i in encode(tokenizer, f"the year {century}32")]
        raise ValueError(
            f"greater_than_task needs the tokenizer to split '{century}YY' into '{century}' + "
            f"'YY'; it never does for century={century} ('the year {century}32' -> {example})"
        )
    return years


def _draw_prompts(
    tokenize: PromptTokenizer,
    nouns: list[str],
    years: list[int],
    length: int,
    n: int,
    seed: int,
    century: int,
) -> tuple[list[list[int]], list[int], list[str]]:
    """``n`` random (noun, year) prompts of ``length`` ids: their ids, years and texts."""
    gen = torch.Generator().manual_seed(seed)
    rows: list[list[int]] = []
    yys: list[int] = []
    prompts: list[str] = []
    for _ in range(10 * n + 100):
        if len(rows) == n:
            break
        noun = nouns[int(torch.randint(len(nouns), (), generator=gen))]
        yy = years[int(torch.randint(len(years), (), generator=gen))]
        ids = tokenize(noun, yy)
        if ids is None or len(ids) != length:
            continue  # this noun changes how the year is split; draw another
        rows.append(ids)
        yys.append(yy)
        prompts.append(f"The {noun} lasted from the year {century}{yy:02d} to the year {century}")
    if len(rows) < n:
        raise ValueError(f"only {len(rows)} of n={n} greater-than prompts tokenize consistently")
    return rows, yys, prompts
