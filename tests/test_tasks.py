"""Tasks: exact structure of the generated data, metric signs and values, and clear errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import tl_noise as tn
from tl_noise.tasks import (
    TASKS,
    Task,
    greater_than_task,
    induction_batch_loss,
    induction_task,
    ioi_task,
    make_task,
    text_task,
)
from tl_noise.tasks.greater_than import NOUNS
from tl_noise.tasks.ioi import NAMES, OBJECTS, PLACES, TEMPLATES

pytestmark = pytest.mark.tl3  # tokenizers and models built the same way on TransformerLens 3.x

BOS = "<|endoftext|>"


def _wrap(tokenizer, bos: str | None = BOS):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=bos, unk_token=BOS)


def _word_level(words, pre_tokenizer=None, bos: str | None = BOS):
    """A word-level tokenizer over ``words`` (unknown words -> the BOS/unk id 0)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {BOS: 0}
    for word in words:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=BOS))
    tok.pre_tokenizer = pre_tokenizer or pre_tokenizers.WhitespaceSplit()
    return _wrap(tok, bos)


@pytest.fixture(scope="module")
def word_tokenizer(gpt2_checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gpt2_checkpoint)


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """Byte-level BPE (GPT-2 style, " Mary" is one token) that knows only six of the names."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = [
        t.format(A=name, B=name, PLACE=place, OBJECT=obj).replace(" , ", ", ")
        for t in TEMPLATES
        for name in ("Mary", "John", "Tom", "Kate", "Amy", "Ben")
        for place, obj in zip(PLACES, OBJECTS, strict=True)
    ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=[BOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(corpus, trainer)
    return _wrap(tok)


@pytest.fixture(scope="module")
def digit_tokenizer():
    """Word level over the greater-than prompts, "1732" pre-tokenized as "17" "32"; no "war"."""
    from tokenizers import Regex, pre_tokenizers

    words = "The lasted from the year to".split() + [w for w in NOUNS if w != "war"]
    words += [f"{k:02d}" for k in range(100)]
    split = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(r"\d\d"), "isolated")]
    )
    return _word_level(words, split)


# ---------------------------------------------------------------- induction


@settings(max_examples=40, deadline=None)
@given(
    d_vocab=st.integers(2, 300),
    seq_len=st.integers(4, 40),
    data=st.data(),
    with_bos=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_induction_structure(d_vocab, seq_len, data, with_bos, seed):
    offset = int(with_bos)
    bos = data.draw(st.integers(0, d_vocab - 1)) if with_bos else None
    max_period = data.draw(st.integers(1, seq_len - offset - 1))
    min_period = data.draw(st.integers(1, max_period))
    task = induction_task(d_vocab, n=7, seq_len=seq_len, min_period=min_period,
                          max_period=max_period, seed=seed, bos=bos)  # fmt: skip
    tokens, mask, period = task.tokens, task.loss_mask, task.extras["period"]
    assert tokens.shape == mask.shape == (7, seq_len) and tokens.dtype == torch.long
    assert period.shape == (7,) and ((min_period <= period) & (period <= max_period)).all()
    assert tokens.min() >= 0 and tokens.max() < d_vocab
    if bos is not None:
        assert (tokens[:, 0] == bos).all() and not (tokens[:, 1:] == bos).any()
    for i in range(7):
        p = int(period[i])
        for t in range(seq_len):
            if t >= offset + p:
                assert tokens[i, t] == tokens[i, t - p]
            assert bool(mask[i, t]) == (offset + p <= t + 1 < seq_len), (i, t, p)
    assert task.info == {"d_vocab": d_vocab, "n": 7, "seq_len": seq_len, "min_period": min_period,
                         "max_period": max_period, "seed": seed, "bos": bos}  # fmt: skip


def test_induction_defaults_and_seeds():
    task = induction_task(100)
    assert task.tokens.shape == (256, 32) and task.name == "induction"
    assert set(task.extras["period"].tolist()) == set(range(4, 17))  # default max = seq_len // 2
    again, other = induction_task(100), induction_task(100, seed=1)
    assert torch.equal(task.tokens, again.tokens) and torch.equal(task.loss_mask, again.loss_mask)
    assert not torch.equal(task.tokens, other.tokens)


def test_induction_tiny_vocabulary_with_bos():
    task = induction_task(2, n=5, seq_len=8, min_period=2, max_period=3, bos=0)
    assert (task.tokens[:, 1:] == 1).all()  # the only token that is not BOS


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(d_vocab=1), "d_vocab=1"),
        (dict(d_vocab=10, bos=10), r"bos=10 is outside the vocabulary \[0, 10\)"),
        (dict(d_vocab=10, seq_len=8, max_period=8), "max_period=8 leaves nothing"),
        (dict(d_vocab=10, seq_len=8, max_period=7, bos=0), "expected max_period <= 6"),
        (dict(d_vocab=10, min_period=5, max_period=4), r"periods \[5, 4\]"),
        (dict(d_vocab=10, min_period=0), r"periods \[0, 16\]"),
        (dict(d_vocab=10, n=0), "n=0"),
    ],
)
def test_induction_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        induction_task(**kwargs)


def test_induction_metric_reads_only_masked_positions():
    task = induction_task(20, n=4, seq_len=16, bos=0)
    batch = task.batch(torch.arange(4))
    nxt = F.one_hot(task.tokens[:, 1:], 20).float()
    perfect = torch.cat([20.0 * nxt, torch.zeros(4, 1, 20)], dim=1)  # logits[t] -> tokens[t + 1]
    assert task.metric(perfect, batch) < 1e-6
    assert math.isclose(task.metric(torch.zeros(4, 16, 20), batch), math.log(20), rel_tol=1e-6)
    wrong_outside = perfect.clone()
    wrong_outside[~task.loss_mask] = -20.0 * perfect[~task.loss_mask]
    assert task.metric(wrong_outside, batch) < 1e-6
    wrong_inside = perfect.clone()
    wrong_inside[task.loss_mask] = -20.0 * perfect[task.loss_mask]
    assert task.metric(wrong_inside, batch) > 10
    manual = F.cross_entropy(torch.zeros(4, 15, 20)[task.loss_mask[:, :-1]],
                             task.tokens[:, 1:][task.loss_mask[:, :-1]])  # fmt: skip
    assert torch.isclose(induction_batch_loss(torch.zeros(4, 16, 20), task.tokens,
                                              task.loss_mask), manual)  # fmt: skip


# ---------------------------------------------------------------- IOI


def _roles(prompt: str, io: str, s: str) -> None:
    """IO once, in the first clause; S twice: first clause, then as the subject giving."""
    words = prompt.replace(",", " ,").split()
    assert words.count(io) == 1 and words.count(s) == 2, prompt
    first = words.index("and")
    assert {words[first - 1], words[first + 1]} == {io, s}, prompt
    assert max(i for i, w in enumerate(words) if w == s) > first + 1, prompt


def test_ioi_word_level(word_tokenizer):
    task = ioi_task(word_tokenizer, n=64, seed=3)
    n, length = task.tokens.shape
    assert n == 64 and task.name == "ioi"
    assert (task.tokens[:, 0] == word_tokenizer.bos_token_id).all()
    assert torch.equal(task.loss_mask, F.one_hot(torch.full((n,), length - 1), length).bool())
    assert (task.extras["metric_positions"] == length - 1).all()
    prompts = task.info["prompts"]
    assert len(task.info["templates"]) > 1
    swapped = 0
    for i, prompt in enumerate(prompts):
        assert word_tokenizer.decode(task.tokens[i, 1:]) == prompt
        io = word_tokenizer.decode([int(task.extras["answers"][i])])
        s = word_tokenizer.decode([int(task.extras["distractors"][i])])
        assert io in NAMES and s in NAMES and io != s
        _roles(prompt, io, s)
        swapped += prompt.split().index(s) < prompt.split().index(io)
    assert swapped == n // 2
    assert len({p.split()[0] for p in prompts}) > 1  # several templates are used


def test_ioi_seeds_and_no_bos(word_tokenizer):
    a, b, c = (ioi_task(word_tokenizer, n=16, seed=s) for s in (0, 0, 1))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.extras["answers"],
                                                           b.extras["answers"])  # fmt: skip
    assert not torch.equal(a.tokens, c.tokens)
    no_bos = ioi_task(word_tokenizer, n=16, seed=0, prepend_bos=False)
    assert torch.equal(no_bos.tokens, a.tokens[:, 1:])
    assert (no_bos.extras["metric_positions"] == a.extras["metric_positions"] - 1).all()


def test_ioi_metric_sign(word_tokenizer):
    task = ioi_task(word_tokenizer, n=8)
    batch = task.batch(torch.arange(8))
    logits = torch.randn(8, task.tokens.shape[1], len(word_tokenizer))
    rows = torch.arange(8)
    logits[rows, -1, batch["answers"]] = 3.0
    logits[rows, -1, batch["distractors"]] = 1.0
    logits[rows, 0, batch["distractors"]] = 100.0  # positions before the last do not count
    assert torch.isclose(task.metric(logits, batch), torch.tensor(-2.0))
    logits[rows, -1, batch["answers"]] = -1.0
    assert torch.isclose(task.metric(logits, batch), torch.tensor(2.0))


def test_ioi_bpe_keeps_single_token_names(bpe_tokenizer):
    task = ioi_task(bpe_tokenizer, n=32)
    assert sorted(task.info["names"]) == sorted(["Mary", "John", "Tom", "Kate", "Amy", "Ben"])
    for i, prompt in enumerate(task.info["prompts"]):
        assert ", " in prompt and " , " not in prompt  # the tokenizer handles punctuation
        answer = bpe_tokenizer.decode([int(task.extras["answers"][i])])
        distractor = bpe_tokenizer.decode([int(task.extras["distractors"][i])])
        assert answer.startswith(" ") and distractor.startswith(" ")  # " Mary", as the next token
        _roles(prompt, answer.strip(), distractor.strip())
        assert bpe_tokenizer.decode(task.tokens[i, 1:]) == prompt


def test_ioi_errors(word_tokenizer, tiny_model):
    words = [w for t in TEMPLATES for w in t.split()] + PLACES + OBJECTS
    with pytest.raises(ValueError, match="at least 2 names .* has 1 of"):
        ioi_task(_word_level(words + ["Mary"]))
    with pytest.raises(ValueError, match="at least 1 places"):
        ioi_task(_word_level([w for t in TEMPLATES for w in t.split()] + NAMES + OBJECTS))
    with pytest.raises(ValueError, match="no bos_token_id; pass prepend_bos=False"):
        ioi_task(_word_level(words + NAMES, bos=None))
    assert len(ioi_task(_word_level(words + NAMES, bos=None), n=4, prepend_bos=False)) == 4
    with pytest.raises(ValueError, match="has no tokenizer"):
        ioi_task(tiny_model)
    with pytest.raises(TypeError, match="expected a tokenizer"):
        ioi_task("gpt2")


def test_ioi_on_a_loaded_model(gpt2_checkpoint, word_tokenizer):
    model = tn.load_model(gpt2_checkpoint)
    task = make_task("ioi", model, n=8)
    assert torch.equal(task.tokens, ioi_task(word_tokenizer, n=8).tokens)
    with torch.no_grad():
        loss = task.metric(model(task.tokens), task.batch(torch.arange(8)))
    assert loss.shape == () and torch.isfinite(loss)


# ---------------------------------------------------------------- greater-than


def test_greater_than_structure(digit_tokenizer):
    task = greater_than_task(digit_tokenizer, n=64, seed=1)
    n, length = task.tokens.shape
    year_ids = task.info["year_token_ids"]
    assert [digit_tokenizer.decode([i]) for i in year_ids] == [f"{k:02d}" for k in range(100)]
    assert "war" not in task.info["nouns"] and len(task.info["nouns"]) == len(NOUNS) - 1
    assert torch.equal(task.loss_mask, F.one_hot(torch.full((n,), length - 1), length).bool())
    assert (task.extras["metric_positions"] == length - 1).all()
    yy = task.extras["yy"]
    assert ((yy >= 2) & (yy <= 98)).all() and len(set(yy.tolist())) > 20
    century = digit_tokenizer.convert_tokens_to_ids("17")
    for i, prompt in enumerate(task.info["prompts"]):
        assert prompt == digit_tokenizer.decode(task.tokens[i, 1:]).replace("17 ", "17", 1)
        assert prompt.startswith("The ") and prompt.endswith(f"17{int(yy[i]):02d} to the year 17")
        assert task.tokens[i, -1] == century and task.tokens[i, 0] == digit_tokenizer.bos_token_id
        # [BOS] The noun lasted from the year 17 YY ...
        assert task.tokens[i, 8] == year_ids[int(yy[i])]
    again = greater_than_task(digit_tokenizer, n=64, seed=1)
    other = greater_than_task(digit_tokenizer, n=64, seed=2)
    assert torch.equal(again.tokens, task.tokens) and not torch.equal(other.tokens, task.tokens)
    nineteen = greater_than_task(digit_tokenizer, n=4, century=19)
    assert nineteen.info["prompts"][0].endswith("to the year 19")


def test_greater_than_probability_difference(digit_tokenizer):
    task = greater_than_task(digit_tokenizer, n=16)
    batch = task.batch(torch.arange(16))
    year_ids = torch.tensor(task.info["year_token_ids"])
    yy, rows = batch["yy"], torch.arange(16)
    logits = torch.full((16, task.tokens.shape[1], len(digit_tokenizer)), -1e4)
    logits[rows, -1, year_ids[yy + 1]] = 0.0  # all mass on the next year: the best score, -1
    assert torch.isclose(task.metric(logits, batch), torch.tensor(-1.0))
    logits[rows, -1, year_ids[yy + 1]] = -1e4
    logits[rows, -1, year_ids[yy]] = 0.0  # YY itself is not greater: the worst score, +1
    assert torch.isclose(task.metric(logits, batch), torch.tensor(1.0))
    logits[:, -1, year_ids] = 0.0  # uniform over the 100 years
    expected = -((99 - yy) - (yy + 1)).float().mean() / 100
    assert torch.isclose(task.metric(logits, batch), expected)
    logits[:, -1, :] = 0.0  # mass outside the years counts for nothing
    assert torch.isclose(task.metric(logits, batch), expected * 100 / len(digit_tokenizer))


def test_greater_than_needs_two_digit_year_tokens(word_tokenizer):
    with pytest.raises(ValueError, match="'00'..'99' to be a single token .* fails for 100"):
        greater_than_task(word_tokenizer)
    no_split = _word_level("The war lasted from the year to".split() +
                           [f"{k:02d}" for k in range(100)])  # fmt: skip
    with pytest.raises(ValueError, match="split '17YY' into '17' \\+ 'YY'"):
        greater_than_task(no_split)
    with pytest.raises(ValueError, match="century=7"):
        greater_than_task(no_split, century=7)


# ---------------------------------------------------------------- text


def test_text_task(tmp_path, word_tokenizer):
    words = "the store gave a drink to Mary and John went".split()
    text = " ".join(words[i % len(words)] for i in range(7 * 10 + 3))  # 73 tokens
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    ids = torch.tensor(word_tokenizer.encode(text, add_special_tokens=False))
    task = text_task(path, word_tokenizer, seq_len=8)
    assert task.tokens.shape == (10, 8) and task.name == "text"
    assert (task.tokens[:, 0] == word_tokenizer.bos_token_id).all()
    assert torch.equal(task.tokens[:, 1:].reshape(-1), ids[:70])
    assert task.loss_mask[:, :-1].all() and not task.loss_mask[:, -1].any()
    no_bos = text_task(str(path), word_tokenizer, seq_len=8, max_sequences=3, prepend_bos=False)
    assert torch.equal(no_bos.tokens.reshape(-1), ids[:24])
    shuffled = text_task(path, word_tokenizer, seq_len=8, max_sequences=4, seed=0)
    windows = {tuple(row) for row in task.tokens.tolist()}
    assert shuffled.tokens.shape == (4, 8)
    assert {tuple(row) for row in shuffled.tokens.tolist()} <= windows
    assert not torch.equal(shuffled.tokens, task.tokens[:4])
    assert torch.equal(shuffled.tokens, text_task(path, word_tokenizer, 8, 4, seed=0).tokens)
    logits = torch.randn(10, 8, len(word_tokenizer))
    manual = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                             task.tokens[:, 1:].reshape(-1))  # fmt: skip
    assert torch.isclose(task.metric(logits, task.batch(torch.arange(10))), manual)


def test_text_task_errors(tmp_path, word_tokenizer):
    with pytest.raises(ValueError, match="does not exist"):
        text_task(tmp_path / "missing.txt", word_tokenizer)
    (tmp_path / "empty.txt").write_text(" \n", encoding="utf-8")
    with pytest.raises(ValueError, match="is empty"):
        text_task(tmp_path / "empty.txt", word_tokenizer)
    (tmp_path / "short.txt").write_text("the store", encoding="utf-8")
    with pytest.raises(ValueError, match="has 2 tokens; one window of seq_len=8 needs 7"):
        text_task(tmp_path / "short.txt", word_tokenizer, seq_len=8)
    with pytest.raises(ValueError, match="seq_len=1"):
        text_task(tmp_path / "short.txt", word_tokenizer, seq_len=1)


# ---------------------------------------------------------------- make_task


def test_make_task_induction_fits_the_model(tiny_model):
    task = make_task("induction", tiny_model, n=8, seq_len=100)
    assert isinstance(task, Task) and TASKS == ("induction", "ioi", "greater_than", "text")
    assert task.tokens.shape == (8, tiny_model.cfg.n_ctx)
    assert task.tokens.max() < tiny_model.cfg.d_vocab
    with torch.no_grad():
        loss = task.metric(tiny_model(task.tokens), task.batch(torch.arange(8)))
    assert torch.isfinite(loss) and loss > 0


def test_make_task_errors(tiny_model):
    with pytest.raises(ValueError, match="unknown task 'copy'; known tasks: induction, ioi, "
                                         "greater_than, text"):  # fmt: skip
        make_task("copy", tiny_model)
    with pytest.raises(ValueError, match="needs the path"):
        make_task("text", tiny_model)


def test_make_task_text_caps_seq_len(tmp_path, gpt2_checkpoint):
    model = tn.load_model(gpt2_checkpoint)  # n_ctx 64
    path = tmp_path / "corpus.txt"
    path.write_text(" ".join(["the store gave a drink to Mary"] * 40), encoding="utf-8")
    task = make_task("text", model, path=path, seq_len=1000, seed=0)  # every builder takes seed
    assert task.tokens.shape == (4, model.cfg.n_ctx) and task.info["seed"] == 0
