"""Shared by the learned-mask baselines (subnetwork probing, IBCircuit): the full model's
next-token distributions to stay close to, the task loss, and the optimisation loop.

Task loss on a batch ``B`` with target positions ``T_B`` (see :mod:`.common`), ``p`` the full
model's next-token distribution and ``q`` the masked/noised model's:

* ``"kl"``: ``(1 / |T_B|) sum_{T_B} KL(p || q)``, the evaluator's ``kl`` on the batch;
* ``"logprob"``: ``-(1 / |T_B|) sum_{T_B} log q(next token)``, minus the evaluator's metric.

The optimiser is Adam on the method's per-node parameters only; gradients come from
``torch.autograd.grad``, so the model's own ``.grad`` buffers are never written.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from tl_noise.devices import model_device
from tl_noise.errors import TLNoiseValueError
from tl_noise.evaluation.ablation import eval_batches
from tl_noise.evaluation.node_baselines.common import target_log_probs, target_mask

OBJECTIVES = ("kl", "logprob")


def check_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise TLNoiseValueError(f"objective={objective!r}; accepted: {', '.join(OBJECTIVES)}")


class Reference:
    """The full model's next-token log-probs at every target position, stored by row (one
    forward over the evaluation set; ``fwd_hooks`` may observe that pass, e.g. for statistics).

    Memory: ``|T| x d_vocab`` floats.
    """

    def __init__(self, model: Any, tokens: Tensor, loss_mask: Tensor, targets: Tensor,
                 batch_size: int,
                 fwd_hooks: Sequence[tuple[str, Callable[..., Any]]] = ()) -> None:  # fmt: skip
        device = model_device(model)
        parts, counts = [], []
        with torch.no_grad():
            for index in eval_batches(tokens.shape[0], batch_size):
                x, mask = tokens[index].to(device), loss_mask[index].to(device)
                logits = model.run_with_hooks(x, fwd_hooks=list(fwd_hooks))
                keep = target_mask(mask, targets[index].to(device))
                parts.append(F.log_softmax(logits[keep].float(), dim=-1))
                counts.append(keep.sum(1).cpu())
        self.log_probs = torch.cat(parts)
        self.start = torch.cat([torch.zeros(1, dtype=torch.long), torch.cat(counts).cumsum(0)])

    def rows(self, index: Tensor) -> Float[Tensor, "m vocab"]:
        """The log-probs of rows ``index`` (in that order, row-major within a row)."""
        return torch.cat([self.log_probs[self.start[i] : self.start[i + 1]]
                          for i in index.tolist()])  # fmt: skip


def task_loss(objective: str, logits: Tensor, targets: Tensor, loss_mask: Tensor,
              reference: Tensor) -> Tensor:  # fmt: skip
    """The batch's task loss (module doc); ``reference``: :meth:`Reference.rows` of the batch."""
    if objective == "logprob":
        return -target_log_probs(logits, targets, loss_mask).mean()
    keep = target_mask(loss_mask, targets)
    q = F.log_softmax(logits[keep].float(), dim=-1)
    return F.kl_div(q, reference.to(q.device), log_target=True, reduction="batchmean")


def optimise(
    param: Tensor,
    loss_fn: Callable[[Tensor], Tensor],
    batches: list[Tensor],
    lr: float,
) -> list[float]:
    """Adam on ``param`` (a leaf requiring grad), one step per batch of row indices; returns
    the losses. ``loss_fn(index)`` runs the model on those rows."""
    optimizer = torch.optim.Adam([param], lr=lr)
    losses = []
    for index in batches:
        with torch.enable_grad():
            loss = loss_fn(index)
            (grad,) = torch.autograd.grad(loss, [param])
        param.grad = grad
        optimizer.step()
        param.grad = None
        losses.append(float(loss.detach()))
    return losses
