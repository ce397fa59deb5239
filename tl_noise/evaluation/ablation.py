"""Replacing attention heads' outputs, and a task's loss under such replacements.

One mechanism serves mean ablation, resample ablation and activation patching. A head's output
is ``z = blocks.{l}.attn.hook_z`` with shape ``[batch, pos, n_heads, d_head]`` (TransformerLens
3.x and 4.x alike). A :class:`HeadPatch` with a boolean ``heads: [n_layers, n_heads]`` mask and
replacement ``values`` per layer computes

    z'[b, p, h] = values_l[b, p, h]  if heads[l, h]  else  z[b, p, h]

where ``values_l`` is either ``[n_heads, d_head]`` (the same vector for every example and
position: mean ablation) or ``[n, pos, n_heads, d_head]`` (row ``i`` for example ``i`` of the
task: resample ablation, activation patching). The hooks return a new tensor and are
registered through ``model.hooks`` / ``run_with_hooks``, so the model is unchanged afterwards.

>>> from tl_noise.models import load_embedded_model
>>> from tl_noise.tasks import induction_task
>>> model = load_embedded_model()
>>> task = induction_task(model.cfg.d_vocab, n=32, seq_len=model.cfg.n_ctx, bos=0)
>>> heads = torch.zeros(model.cfg.n_layers, model.cfg.n_heads, dtype=torch.bool)
>>> for layer, head in model.ground_truth["induction"]:
...     heads[layer, head] = True
>>> with ablate_heads(model, heads, "mean", task.tokens):
...     logits = model(task.tokens)
>>> clean = task_loss(model, task)
>>> task_loss(model, task, patch=ablate_heads(model, heads, "resample", task.tokens)) > clean + 1
True
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tl_noise.devices import model_device
from tl_noise.fitting.objectives import cross_entropy
from tl_noise.tasks.base import Batch, Task

ABLATIONS = ("mean", "resample")
FwdHooks = list[tuple[str, Callable]]


def z_hook_name(layer: int) -> str:
    """``"blocks.{layer}.attn.hook_z"``: the per-head attention output, in both versions."""
    return f"blocks.{layer}.attn.hook_z"


def model_heads(model: Any) -> tuple[int, int]:
    """``(n_layers, n_heads)`` of a TransformerLens model."""
    return int(model.cfg.n_layers), int(model.cfg.n_heads)


def check_head_tensor(model: Any, x: Tensor, what: str) -> None:
    """ValueError unless ``x`` is shaped ``[n_layers, n_heads]`` for ``model``."""
    shape = model_heads(model)
    if not isinstance(x, Tensor) or tuple(x.shape) != shape:
        got = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{what} must be a tensor [n_layers, n_heads] = {list(shape)}, got {got}")


def resampled_index(n: int, seed: int = 0) -> Tensor:
    """A random derangement ``perm: [n]`` of ``range(n)`` (``perm[i] != i``): one cycle through
    a shuffle.

    Example ``i`` is paired with example ``perm[i]``, never with itself.
    """
    if n < 2:
        raise ValueError(f"resampling needs at least 2 examples to pair, got n={n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    perm = torch.empty(n, dtype=torch.long)
    perm[order] = order.roll(-1)
    return perm


def eval_batches(n: int, batch_size: int) -> list[Tensor]:
    """Consecutive row indices ``[0, b), [b, 2b), ...`` covering ``range(n)``."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}; expected an int >= 1")
    return [torch.arange(s, min(n, s + batch_size)) for s in range(0, n, batch_size)]


@torch.no_grad()
def head_activations(
    model: Any,
    tokens: Int[Tensor, "n pos"],
    layers: list[int] | None = None,
    batch_size: int = 32,
    mean: bool = False,
) -> dict[int, Float[Tensor, "..."]]:
    """``hook_z`` of each layer on ``tokens``: ``[n, pos, n_heads, d_head]`` per layer (model
    dtype, model device), or with ``mean=True`` its mean over examples and positions,
    ``[n_heads, d_head]`` (accumulated in float64)."""
    layers = list(range(model_heads(model)[0])) if layers is None else list(layers)
    device = model_device(model)
    parts: dict[int, list[Tensor]] = {layer: [] for layer in layers}

    def capture(layer: int) -> Callable:
        def hook(z: Tensor, hook: Any) -> None:
            parts[layer].append(z.detach().double().sum((0, 1)) if mean else z.detach().clone())

        return hook

    fwd_hooks = [(z_hook_name(layer), capture(layer)) for layer in layers]
    for index in eval_batches(tokens.shape[0], batch_size):
        model.run_with_hooks(tokens[index].to(device), fwd_hooks=fwd_hooks)
    if mean:
        count = tokens.shape[0] * tokens.shape[1]
        return {k: torch.stack(v).sum(0) / count for k, v in parts.items()}
    return {k: torch.cat(v) for k, v in parts.items()}


class HeadPatch:
    """Replace the ``hook_z`` of the heads marked in ``heads`` by ``values`` (see module doc).

    Args:
        model: a TransformerLens model (bridge or ``HookedTransformer``).
        heads: ``Bool[Tensor, "n_layers n_heads"]``, True = replace that head.
        values: layer -> ``[n_heads, d_head]`` or ``[n, pos, n_heads, d_head]``; needed for every
            layer with a marked head.

    Use :meth:`fwd_hooks` (``index``: the task rows of the batch being run, for per-example
    values) with ``run_with_hooks``, or the object as a context manager (then a per-example
    ``values`` must have exactly as many rows as the batch that is run).
    """

    def __init__(
        self, model: Any, heads: Bool[Tensor, "n_layers n_heads"], values: Mapping[int, Tensor]
    ) -> None:
        check_head_tensor(model, heads, "heads")
        if heads.dtype != torch.bool:
            raise TypeError(f"heads must be a bool mask, got dtype {heads.dtype}")
        n_heads, d_head = model_heads(model)[1], int(model.cfg.d_head)
        device = model_device(model)
        self.model, self.heads = model, heads.to(device)
        self.values: dict[int, Tensor] = {}
        for layer in heads.any(1).nonzero().flatten().tolist():
            if layer not in values:
                raise ValueError(f"no replacement values for layer {layer}, which has heads marked")
            value = values[layer]
            if value.ndim not in (2, 4) or tuple(value.shape[-2:]) != (n_heads, d_head):
                raise ValueError(
                    f"values[{layer}] has shape {list(value.shape)}; expected [n_heads, d_head] "
                    f"= {[n_heads, d_head]} or [n, pos, {n_heads}, {d_head}]"
                )
            self.values[layer] = value.to(device)
        self._context: Any = None

    def _value(self, layer: int, z: Tensor, index: Tensor | None) -> Tensor:
        value = self.values[layer]
        if value.ndim == 4:
            value = value[index.to(value.device)] if index is not None else value
            if value.shape[:2] != z.shape[:2]:
                raise ValueError(
                    f"per-example values for layer {layer} give [batch, pos] = "
                    f"{list(value.shape[:2])} but the model runs {list(z.shape[:2])}; pass the "
                    f"batch's task rows as index"
                )
        return value.to(z.dtype)

    def fwd_hooks(self, index: Tensor | None = None) -> FwdHooks:
        """``[(hook name, fn), ...]`` for ``run_with_hooks``; ``index: [b]`` are the task rows of
        the batch, selecting the rows of per-example values."""

        def make(layer: int) -> Callable:
            mask = self.heads[layer][:, None]  # [n_heads, 1] broadcasts over batch, pos, d_head

            def patch_hook(z: Tensor, hook: Any) -> Tensor:
                return torch.where(mask, self._value(layer, z, index), z)

            return patch_hook

        return [(z_hook_name(layer), make(layer)) for layer in self.values]

    def __enter__(self) -> HeadPatch:
        self._context = self.model.hooks(fwd_hooks=self.fwd_hooks())
        self._context.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        context, self._context = self._context, None
        context.__exit__(*exc)


def ablation_values(
    model: Any, tokens: Int[Tensor, "n pos"], method: str = "mean", batch_size: int = 32,
    seed: int = 0,
) -> dict[int, Tensor]:  # fmt: skip
    """Replacement values for :class:`HeadPatch` that ablate heads on ``tokens``.

    ``"mean"``: ``mean_{b, p} z[b, p]`` per layer, ``[n_heads, d_head]``. ``"resample"``: example
    ``i`` receives the activations of example ``perm[i] != i`` (:func:`resampled_index` with
    ``seed``), ``[n, pos, n_heads, d_head]`` aligned with the rows of ``tokens``.
    """
    if method not in ABLATIONS:
        raise ValueError(f"ablation method={method!r}; accepted: {', '.join(ABLATIONS)}")
    if method == "mean":
        return head_activations(model, tokens, batch_size=batch_size, mean=True)
    perm = resampled_index(tokens.shape[0], seed)
    return head_activations(model, tokens[perm], batch_size=batch_size)


def ablate_heads(
    model: Any,
    heads: Bool[Tensor, "n_layers n_heads"],
    method: str = "mean",
    reference_tokens: Int[Tensor, "n pos"] | Task | None = None,
    batch_size: int = 32,
    seed: int = 0,
) -> HeadPatch:
    """A :class:`HeadPatch` that ablates ``heads`` with statistics of ``reference_tokens``.

    Mean ablation works for any input; resample ablation pairs row ``i`` of the reference data
    with another row, so run it on the reference tokens themselves (whole, as a context manager,
    or by batches through ``fwd_hooks(index)`` / :func:`task_loss`).
    """
    if reference_tokens is None:
        raise ValueError("ablate_heads needs reference_tokens (a [n, pos] tensor or a Task)")
    tokens = reference_tokens.tokens if isinstance(reference_tokens, Task) else reference_tokens
    return HeadPatch(model, heads, ablation_values(model, tokens, method, batch_size, seed))


def task_metric(task: Task) -> Callable[[Tensor, Batch], Tensor]:
    """The task's metric, or next-token cross-entropy at its ``loss_mask`` when it has none."""
    if task.metric is not None:
        return task.metric
    return lambda logits, batch: cross_entropy(logits, batch["tokens"], batch["loss_mask"])


def batch_loss(
    model: Any, task: Task, index: Tensor, tokens: Tensor | None = None,
    fwd_hooks: Sequence[tuple[str, Callable[..., Any]]] = (),
) -> Float[Tensor, ""]:  # fmt: skip
    """``task_metric(task)`` on the rows ``index: [b]``, the model run on ``tokens[index]`` (default
    the task's tokens) with ``fwd_hooks``; the metric always reads the task's own batch."""
    device = model_device(model)
    batch = {k: v.to(device) for k, v in task.batch(index).items()}
    inputs = (task.tokens if tokens is None else tokens)[index].to(device)
    logits = model.run_with_hooks(inputs, fwd_hooks=list(fwd_hooks))
    return task_metric(task)(logits, batch)


@torch.no_grad()
def task_loss(
    model: Any,
    task: Task,
    batch_size: int = 32,
    tokens: Int[Tensor, "n pos"] | None = None,
    patch: HeadPatch | None = None,
) -> float:
    """Mean task loss over the task's data, without gradients.

    ``L = sum_B |B| / n * metric(model(tokens[B]), task.batch(B))`` over batches ``B`` (exact
    mean for a per-example-mean metric). ``tokens`` (same shape as the task's) replaces the input,
    e.g. corrupted prompts, while the metric still scores the task's answers; ``patch`` replaces
    heads during the run.
    """
    if tokens is not None and tokens.shape != task.tokens.shape:
        raise ValueError(f"tokens have shape {list(tokens.shape)}, the task's are "
                         f"{list(task.tokens.shape)}")  # fmt: skip
    total = 0.0
    for index in eval_batches(len(task), batch_size):
        hooks = patch.fwd_hooks(index) if patch is not None else []
        total += float(batch_loss(model, task, index, tokens, hooks)) * len(index)
    return total / len(task)
