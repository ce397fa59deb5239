"""Tasks: the prompts a behaviour is measured on, built offline and seeded.

Each builder returns a :class:`Task` (tokens, the positions whose predictions count, and a metric
that is a loss: lower is better). :func:`make_task` builds one by name for a model:

>>> from tl_noise.models import load_embedded_model
>>> model = load_embedded_model()
>>> task = make_task("induction", model, n=128)          # vocabulary and n_ctx from model.cfg
>>> task.tokens.shape, task.loss_mask.shape
(torch.Size([128, 32]), torch.Size([128, 32]))

The text tasks tokenize with ``model.tokenizer`` (a pretrained model's, e.g. GPT-2's)::

    task = make_task("ioi", model)                        # prompts for model.tokenizer
    task = make_task("text", model, path="corpus.txt")
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tl_noise.tasks.base import Task
from tl_noise.tasks.greater_than import greater_than_task
from tl_noise.tasks.induction import induction_batch_loss, induction_task
from tl_noise.tasks.ioi import ioi_task
from tl_noise.tasks.text import text_task


def _induction(model: Any, kwargs: dict[str, Any]) -> Task:
    seq_len = min(int(kwargs.pop("seq_len", 32)), int(model.cfg.n_ctx))
    kwargs.setdefault("d_vocab", int(model.cfg.d_vocab))
    return induction_task(seq_len=seq_len, **kwargs)


def _text(model: Any, kwargs: dict[str, Any]) -> Task:
    if "path" not in kwargs:
        raise ValueError("make_task('text', model, path=...) needs the path of a UTF-8 text file")
    seq_len = min(int(kwargs.pop("seq_len", 64)), int(model.cfg.n_ctx))
    return text_task(kwargs.pop("path"), model, seq_len=seq_len, **kwargs)


_REGISTRY: dict[str, Callable[[Any, dict[str, Any]], Task]] = {
    "induction": _induction,
    "ioi": lambda model, kwargs: ioi_task(model, **kwargs),
    "greater_than": lambda model, kwargs: greater_than_task(model, **kwargs),
    "text": _text,
}
TASKS: tuple[str, ...] = tuple(_REGISTRY)


def make_task(name: str, model: Any, **kwargs: Any) -> Task:
    """Build the task ``name`` (one of :data:`TASKS`) for a TransformerLens model.

    ``induction`` takes its vocabulary from ``model.cfg.d_vocab``; ``induction`` and ``text`` cap
    ``seq_len`` at ``model.cfg.n_ctx``; ``ioi``, ``greater_than`` and ``text`` tokenize with
    ``model.tokenizer``; ``text`` needs ``path=``. Other keyword arguments go to the builder.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return _REGISTRY[name](model, dict(kwargs))


__all__ = [
    "TASKS",
    "Task",
    "greater_than_task",
    "induction_batch_loss",
    "induction_task",
    "ioi_task",
    "make_task",
    "text_task",
]
