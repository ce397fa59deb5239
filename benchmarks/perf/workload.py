"""The work being timed: the benchmark model, its tokens, and the reference computations (a
plain forward, a naive fit step, a forward + backward through zero offsets)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

import tl_noise as tn
from benchmarks.perf.settings import HOOKS, MODELS
from benchmarks.perf.timing import time_op
from tl_noise.fitting.objectives import kl_divergence, noise_loss
from tl_noise.fitting.projection import alphaless_gradients


def build_model(args: argparse.Namespace, **overrides: Any) -> Any:
    """The benchmark model, as a user would have it: weights left requiring grad (``fit``
    freezes them for its own forward passes)."""
    model = tn.build_native_model({**MODELS[args.model], **overrides}, device=args.device)
    if args.dtype != "fp32":
        model = model.to(torch.bfloat16)
    model.eval()
    return model


def make_tokens(model: Any, n: int, pos: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, int(model.cfg.d_vocab), (n, pos), generator=gen)


def attach(model: Any, tokens: torch.Tensor, hooks: Any = HOOKS) -> Any:
    return tn.attach_noise(model, hooks, granularity="auto", calibration_tokens=tokens[:2])


def plain_forward(model: Any, noise: Any, batch: torch.Tensor, args: argparse.Namespace) -> float:
    """Seconds of ``model(batch)`` without gradients, the noise hooks removed."""
    noise.remove()
    try:
        with torch.no_grad():
            return time_op(lambda: model(batch), args.threads, args.min_run_time)
    finally:
        noise.attach()


def noised_forward(model: Any, batch: torch.Tensor, args: argparse.Namespace) -> float:
    """Seconds of ``model(batch)`` without gradients, with the noise as attached."""
    with torch.no_grad():
        return time_op(lambda: model(batch), args.threads, args.min_run_time)


def naive_step_fn(
    model: Any, noise: Any, batch: torch.Tensor, opt: torch.optim.Optimizer
) -> Callable[[], None]:
    """One textbook step: clean forward + noised forward + backward (KL from log-softmaxes, the
    model's weights as the user has them), the alphaless combination, an optimiser step."""
    params = [p for p in noise.parameters() if p.requires_grad]
    layers = [layer for _, layer in noise.items()]

    def step() -> None:
        with torch.no_grad():
            noise.set_mode("off")
            clean = model(batch)
            noise.set_mode("sample")
            clean_lp = torch.log_softmax(clean.float(), dim=-1)
        logits = model(batch)
        vocab = logits.shape[-1]
        task = kl_divergence(clean_lp.reshape(-1, vocab), logits.reshape(-1, vocab))
        n_loss = noise_loss([layer.std_for_loss() for layer in layers])
        g_n = torch.autograd.grad(n_loss, params)
        g_t = torch.autograd.grad(task, params)
        for p, g in zip(params, alphaless_gradients(g_n, g_t), strict=True):
            p.grad = g
        opt.step()
        opt.zero_grad(set_to_none=True)
        task.item()

    return step


def offset_backward_fn(model: Any, batch: torch.Tensor) -> Callable[[], None]:
    """Forward + backward with frozen weights reaching every ``hook_z`` through a zero offset,
    loss cross-entropy: the memory a fit step is compared with."""
    for p in model.parameters():
        p.requires_grad_(False)
    names = [n for n in model.hook_dict if n.endswith("attn.hook_z")]
    deltas: list[torch.Tensor] = []

    def offset_hook(z: torch.Tensor, hook: Any) -> torch.Tensor:
        delta = torch.zeros((), device=z.device, dtype=z.dtype, requires_grad=True)
        deltas.append(delta)
        return z + delta

    def step() -> None:
        deltas.clear()
        logits = model.run_with_hooks(batch, fwd_hooks=[(n, offset_hook) for n in names])
        vocab = logits.shape[-1]
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), batch[:, 1:].reshape(-1))
        del logits
        torch.autograd.grad(loss, deltas)

    return step
