"""One task loss per objective, as the trainer uses them: what behaviour the noise costs.

* ``"kl"``: ``KL(p_clean || p_noised)`` of the next-token distributions at masked positions; the
  clean distributions come from :class:`CleanTargets` (cached while under a memory budget);
* ``"ce"``: next-token cross-entropy at masked positions (against the batch's ``targets`` when
  the task has them: :mod:`tl_noise.hooks.targets`);
* ``"metric"``: the task's metric, or any callable ``metric(logits, batch) -> scalar``.

Each returns ``(loss, terms)``: ``terms`` is how many loss terms the batch contributed (masked
rows or examples), the weight of a rank's shard in data-parallel fitting.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tl_noise.devices import model_device
from tl_noise.fitting.objectives import (
    clean_distribution,
    cross_entropy,
    kl_divergence_from_probs,
    next_token_mask,
)
from tl_noise.hooks import NoiseHooks
from tl_noise.hooks.owners import all_noise_switched_off
from tl_noise.hooks.targets import TARGETS_KEY, target_log_probs

Batch = dict[str, Tensor]


class TaskLoss(Protocol):
    def prepare(self, idx: Tensor) -> None:
        """Called before the noised forward of the examples ``idx`` (the KL's clean targets)."""
        ...

    def __call__(self, logits: Tensor, batch: Batch) -> tuple[Float[Tensor, ""], float]: ...


def masked_rows(logits: Float[Tensor, "b pos vocab"], mask: Bool[Tensor, "b pos"]) -> Tensor:
    """``logits[mask]`` as ``[rows, vocab]``; a view, not a copy, when the mask selects all."""
    if bool(mask.all()):
        return logits.reshape(-1, logits.shape[-1])
    return logits[mask]


class CleanTargets:
    """Clean next-token distributions at masked positions, cached while under a budget.

    Stored as float32 probabilities ``p`` (one block of rows per example) and the row sums
    ``sum_v p log p`` (:func:`~tl_noise.fitting.objectives.clean_distribution`), which is what
    :func:`~tl_noise.fitting.objectives.kl_divergence_from_probs` needs: a step pays for no
    ``exp`` of the clean distribution and no concatenation of the cached rows. When the dataset's
    rows exceed ``cache_mb``, each batch's targets are computed once, without gradients, in the
    step. The cache is built in chunks of ``chunk`` examples, so building it needs no more memory
    than a step.
    """

    def __init__(
        self,
        model: Any,
        noise: NoiseHooks,
        tokens: Int[Tensor, "n pos"],
        mask: Bool[Tensor, "n pos"],
        cache_mb: float,
        chunk: int = 32,
    ):
        self.model, self.noise, self.tokens, self.mask = model, noise, tokens, mask
        rows = int(mask.sum())
        self.cache: list[tuple[Tensor, Tensor]] | None = None
        if rows * int(model.cfg.d_vocab) * 4 <= cache_mb * 2**20:
            self.cache = []
            for start in range(0, tokens.shape[0], chunk):
                idx = torch.arange(start, min(start + chunk, tokens.shape[0]))
                probs, neg_entropy = self._compute(idx)
                counts = mask[idx].sum(1).tolist()
                self.cache.extend(zip(probs.split(counts), neg_entropy.split(counts), strict=True))

    @torch.no_grad()
    def _compute(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        with all_noise_switched_off(self.model, self.noise):  # any other NoiseHooks too
            logits = self.model(self.tokens[idx].to(model_device(self.model)))
        return clean_distribution(masked_rows(logits, self.mask[idx].to(logits.device)))

    def __call__(self, idx: Tensor) -> tuple[list[Tensor], Tensor]:
        """``(probability row blocks, sum p log p per row)`` of the examples ``idx``."""
        if self.cache is not None:
            pieces = [self.cache[i] for i in idx.tolist()]
            return [p for p, _ in pieces], torch.cat([h for _, h in pieces])
        probs, neg_entropy = self._compute(idx)
        return [probs], neg_entropy


class KLTaskLoss:
    """``KL(p_clean || p_noised)`` averaged over the batch's masked positions."""

    def __init__(self, targets: CleanTargets) -> None:
        self.targets = targets
        self._clean: tuple[list[Tensor], Tensor] | None = None

    def prepare(self, idx: Tensor) -> None:
        # clean targets first: uncached, their transient memory is gone before the noised pass
        self._clean = self.targets(idx)

    def __call__(self, logits: Tensor, batch: Batch) -> tuple[Float[Tensor, ""], float]:
        if self._clean is None:
            raise RuntimeError("KLTaskLoss.prepare(idx) must run before each batch's loss")
        probs, neg_entropy = self._clean
        self._clean = None
        rows = masked_rows(logits, batch["loss_mask"])
        return kl_divergence_from_probs(probs, neg_entropy, rows), float(batch["loss_mask"].sum())


class CETaskLoss:
    """Next-token cross-entropy at the batch's masked positions (the task's own targets when
    the batch has them)."""

    def prepare(self, idx: Tensor) -> None:
        pass

    def __call__(self, logits: Tensor, batch: Batch) -> tuple[Float[Tensor, ""], float]:
        if TARGETS_KEY in batch:
            logp = target_log_probs(logits, batch[TARGETS_KEY], batch["loss_mask"])
            if not logp.numel():
                raise ValueError("loss_mask selects no position with a target")
            return -logp.mean(), float(logp.numel())
        loss = cross_entropy(logits, batch["tokens"], batch["loss_mask"])
        return loss, float(next_token_mask(batch["loss_mask"])[:, :-1].sum())


class MetricTaskLoss:
    """A metric ``metric(logits, batch) -> scalar`` to minimise (one term per example)."""

    def __init__(self, metric: Callable[[Tensor, Batch], Tensor]) -> None:
        self.metric = metric

    def prepare(self, idx: Tensor) -> None:
        pass

    def __call__(self, logits: Tensor, batch: Batch) -> tuple[Float[Tensor, ""], float]:
        return self.metric(logits, batch), float(len(batch["index"]))
