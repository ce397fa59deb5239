"""Train the embedded model: a 2-layer attention-only transformer whose circuit is induction.

Usage::

    .venv/bin/python scripts/train_embedded.py [--out tl_noise/data] [--steps N] [--seed S]

Writes ``induction-2l.safetensors`` (weights in TransformerLens 3.x's canonical layout, float32)
and ``induction-2l.json`` (the config for :func:`tl_noise.models.build_native_model`, the ground
truth head labels, the per-head scores, the losses and the training settings) to ``--out``.

Data. Every sequence is ``[BOS=0, s_1 .. s_P, s_1 .. s_P, s_1 ..]`` cut to ``n_ctx`` tokens: a
segment of ``P`` tokens drawn uniformly (with replacement) from ``1 .. d_vocab-1``, repeated with a
period ``P`` drawn uniformly from ``PERIODS``. The first segment is unpredictable; every later
token is a copy of the token ``P`` places back, and since ``P`` varies from sequence to sequence
the only way to predict it is induction: find the previous occurrence of the current token and
copy the token after it. A position ``t`` is a *repeat position* when token ``t`` is itself a
repeat (``t >= P + 1``); there the next token is determined.

Training. Next-token cross-entropy on *every* position (the first segment teaches the model to
stay near uniform when nothing repeats, so it is a sensible language model, not only a copier),
AdamW, CPU, through the TransformerLens 4.x ``TransformerBridge`` when it is installed (3.x trains
a ``HookedTransformer``; same script). Left alone, training spreads induction over all four layer-1
heads; a group-lasso penalty on the heads' OV circuits with unequal per-head prices (see
:func:`train`) makes the circuit crisp: one previous-token head, one induction head, and the
other six heads switched off (OV norm ~0). About 2-3 minutes on one CPU thread; the result is
deterministic for a given seed and torch version.

Ground truth. After training, per head: the previous-token score (mean attention from ``t`` to
``t - 1`` on uniformly random tokens), the induction score (mean attention from a repeat
position to the tokens after the earlier occurrences of its token) and the mean-ablation effect
(increase of the repeat-position loss when the head's ``hook_z`` is replaced by its mean over
batch and position). Previous-token heads are the layer-0 heads with previous-token score above
``SCORE_THRESHOLD`` whose ablation raises the repeat loss by more than ``ABLATION_THRESHOLD``
nats; induction heads the same in layer 1 with the induction score.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tl_noise.io import write_json, write_tensors
from tl_noise.models import build_native_model, canonical_state_dict, load_canonical_state_dict

CONFIG: dict[str, Any] = dict(
    n_layers=2, d_model=64, n_heads=4, d_head=16, d_vocab=64, n_ctx=48, attn_only=True,
    normalization_type=None, positional_embedding_type="standard", act_fn=None, seed=0,
)  # fmt: skip
BOS = 0
PERIODS = (3, 23)  # inclusive; P = 23 still leaves 24 repeat tokens in 48
SCORE_THRESHOLD = 0.3
ABLATION_THRESHOLD = 0.5  # nats of repeat-position loss
EVAL_BATCH = 512


def repeated_tokens(
    n: int, n_ctx: int, d_vocab: int, generator: torch.Generator, periods: tuple[int, int] = PERIODS
) -> tuple[Int[Tensor, "n n_ctx"], Bool[Tensor, "n n_ctx"], Int[Tensor, " n"]]:
    """``n`` sequences ``[BOS, segment, segment, ...]``; returns tokens, repeat mask and periods.

    ``repeat[b, t]`` is True when token ``t`` is a copy of token ``t - period[b]``.
    """
    period = torch.randint(periods[0], periods[1] + 1, (n,), generator=generator)
    segment = torch.randint(1, d_vocab, (n, periods[1]), generator=generator)
    pos = torch.arange(n_ctx - 1)
    index = pos[None, :] % period[:, None]  # content position i copies segment[i % P]
    tokens = torch.cat([torch.full((n, 1), BOS), segment.gather(1, index)], dim=1)
    repeat = torch.cat([torch.zeros(n, 1, dtype=torch.bool), pos[None, :] >= period[:, None]], 1)
    return tokens, repeat, period


def random_tokens(n: int, n_ctx: int, d_vocab: int, generator: torch.Generator) -> Tensor:
    """``n`` sequences ``[BOS, uniform tokens from 1 .. d_vocab-1]``."""
    body = torch.randint(1, d_vocab, (n, n_ctx - 1), generator=generator)
    return torch.cat([torch.full((n, 1), BOS), body], dim=1)


def induction_targets(
    tokens: Int[Tensor, "b n_ctx"], repeat: Bool[Tensor, "b n_ctx"]
) -> Bool[Tensor, "b n_ctx n_ctx"]:
    """``[b, q, k]``: key ``k`` follows an earlier occurrence of token ``q`` (``q`` a repeat).

    Every such ``k`` predicts the next token, so an induction head may split its attention among
    all of them (a token repeated for the third time has two previous occurrences).
    """
    n_ctx = tokens.shape[1]
    prev = torch.cat([torch.full_like(tokens[:, :1], -1), tokens[:, :-1]], dim=1)  # token k - 1
    match = tokens[:, :, None] == prev[:, None, :]
    causal = torch.ones(n_ctx, n_ctx, dtype=torch.bool).tril()
    return match & causal & repeat[:, :, None]


def token_losses(
    model: Any, tokens: Int[Tensor, "b n_ctx"], fwd_hooks: list | None = None
) -> Float[Tensor, "b n_ctx-1"]:
    """Cross-entropy of predicting token ``t + 1`` at every query position ``t``."""
    logits = model.run_with_hooks(tokens, fwd_hooks=fwd_hooks or [])
    return F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), tokens[:, 1:], reduction="none")


def head_scores(model: Any, generator: torch.Generator) -> dict[str, Any]:
    """Per-head previous-token score, induction score and mean-ablation effect, plus losses."""
    cfg = model.cfg
    n_layers, n_heads, n_ctx, d_vocab = cfg.n_layers, cfg.n_heads, cfg.n_ctx, cfg.d_vocab
    with torch.no_grad():
        rand = random_tokens(EVAL_BATCH, n_ctx, d_vocab, generator)
        _, cache = model.run_with_cache(rand, names_filter=lambda n: n.endswith("hook_pattern"))
        prev = torch.stack([
            cache[f"blocks.{layer}.attn.hook_pattern"].diagonal(-1, -2, -1)[..., 1:].mean((0, 2))
            for layer in range(n_layers)
        ])  # fmt: skip  # from t >= 2 to t - 1 (t = 1 -> BOS is excluded)

        tokens, repeat, _ = repeated_tokens(EVAL_BATCH, n_ctx, d_vocab, generator)
        _, cache = model.run_with_cache(tokens)
        target = induction_targets(tokens, repeat)
        induction = torch.stack([
            (cache[f"blocks.{layer}.attn.hook_pattern"] * target[:, None]).sum(-1).sum((0, 2))
            / repeat.sum()
            for layer in range(n_layers)
        ])  # fmt: skip

        query = repeat[:, :-1]
        losses = token_losses(model, tokens)
        repeat_loss = losses[query].mean().item()
        ablation = torch.zeros(n_layers, n_heads)
        for layer in range(n_layers):
            name = f"blocks.{layer}.attn.hook_z"
            z = cache[name]
            for head in range(n_heads):
                hook = mean_ablate(head, z[:, :, head].mean((0, 1)))
                ablated = token_losses(model, tokens, [(name, hook)])[query].mean().item()
                ablation[layer, head] = ablated - repeat_loss
        random_loss = token_losses(model, rand)[:, 1:].mean().item()
    return dict(
        previous_token=prev, induction=induction, ablation=ablation,
        losses=dict(repeat=repeat_loss, first_segment=losses[~query].mean().item(),
                    random_sequence=random_loss, uniform=math.log(d_vocab - 1)),
    )  # fmt: skip


def mean_ablate(head: int, mean: Float[Tensor, " d_head"]) -> Any:
    """A ``hook_z`` hook replacing head ``head`` by ``mean`` at every batch element and position."""

    def hook(z: Float[Tensor, "b pos n_heads d_head"], hook: Any) -> Tensor:
        z = z.clone()
        z[:, :, head] = mean
        return z

    return hook


def label_heads(scores: dict[str, Any]) -> dict[str, list[list[int]]]:
    """Ground truth: layer-0 previous-token heads and layer-1 induction heads that matter."""
    prev, ind, abl = scores["previous_token"], scores["induction"], scores["ablation"]

    def heads(layer: int, score: Tensor) -> list[list[int]]:
        keep = (score[layer] > SCORE_THRESHOLD) & (abl[layer] > ABLATION_THRESHOLD)
        return [[layer, int(h)] for h in keep.nonzero().flatten()]

    return {"previous_token": heads(0, prev), "induction": heads(1, ind)}


def head_ov_norms(model: Any) -> Float[Tensor, "n_layers n_heads"]:
    """Frobenius norm of each head's OV circuit ``W_V[h] @ W_O[h]`` (differentiable)."""
    return torch.stack([
        torch.linalg.matrix_norm(block.attn.W_V @ block.attn.W_O) for block in model.blocks
    ])  # fmt: skip


def head_prices(seed: int) -> Float[Tensor, "n_layers n_heads"]:
    """Per-head penalty weights: in each layer a seeded permutation of ``1 .. n_heads``."""
    gen = torch.Generator().manual_seed(seed + 3)
    n_layers, n_heads = CONFIG["n_layers"], CONFIG["n_heads"]
    return 1.0 + torch.stack([torch.randperm(n_heads, generator=gen) for _ in range(n_layers)])


def train(
    steps: int, seed: int, batch: int, lr: float, weight_decay: float, head_l1: float
) -> tuple[Any, list]:
    """Fit the model; returns it and the ``[step, loss, repeat loss]`` log.

    ``head_l1`` weighs a group-lasso penalty ``sum_{l,h} c[l,h] ||W_V[l,h] W_O[l,h]||_F`` on the
    heads' OV circuits, ramped in linearly over the first half of training so it does not stop
    the circuit from forming. ``c[l]`` is a seeded permutation of ``1 .. n_heads``: a plain
    (uniform) group lasso is indifferent between one head doing a job and several heads sharing
    it, and training spreads induction over every head; unequal prices break the tie, so each
    role ends up with the fewest (cheapest) heads that can carry it and the rest switch off.
    """
    torch.manual_seed(seed)
    model = build_native_model({**CONFIG, "seed": seed})
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    price = head_prices(seed)
    print("head prices:", price.int().tolist())
    gen = torch.Generator().manual_seed(seed + 1)
    log = []
    for step in range(steps):
        tokens, repeat, _ = repeated_tokens(batch, CONFIG["n_ctx"], CONFIG["d_vocab"], gen)
        losses = token_losses(model, tokens)
        loss = losses.mean()
        ramp = min(1.0, 2 * step / steps)
        penalty = head_l1 * ramp * (price * head_ov_norms(model)).sum() if head_l1 else 0.0
        opt.zero_grad(set_to_none=True)
        (loss + penalty).backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps - 1:
            rep = losses.detach()[repeat[:, :-1]].mean().item()
            log.append([step, round(loss.item(), 4), round(rep, 4)])
            print(f"step {step:5d}  loss {loss.item():.4f}  repeat loss {rep:.4f}", flush=True)
    model.eval()
    return model, log


def format_table(scores: dict[str, Any]) -> str:
    """Scores as a plain-text table, one row per head."""
    rows = ["layer head  prev_token  induction  ablation(nats)  ov_norm"]
    for layer in range(scores["previous_token"].shape[0]):
        for head in range(scores["previous_token"].shape[1]):
            rows.append(
                f"{layer:5d} {head:4d}  {scores['previous_token'][layer, head]:10.3f}"
                f"  {scores['induction'][layer, head]:9.3f}"
                f"  {scores['ablation'][layer, head]:14.3f}  {scores['ov_norm'][layer, head]:7.3f}"
            )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """Train, score, label and write the embedded model."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("tl_noise/data"))
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--head-l1", type=float, default=3e-2)
    args = parser.parse_args(argv)
    # The model is tiny: extra threads only add synchronisation (10x slower on a busy 2-core box).
    torch.set_num_threads(1)

    start = time.perf_counter()
    model, log = train(args.steps, args.seed, args.batch, args.lr, args.weight_decay, args.head_l1)
    train_seconds = time.perf_counter() - start

    state = {k: v.float().contiguous() for k, v in canonical_state_dict(model).items()}
    # Score the weights as they will be loaded: rebuilt from the canonical state dict.
    fresh = build_native_model(CONFIG)
    load_canonical_state_dict(fresh, state)
    fresh.eval()
    scores = head_scores(fresh, torch.Generator().manual_seed(args.seed + 2))
    labels = label_heads(scores)
    scores["ov_norm"] = head_ov_norms(fresh).detach()
    print(format_table(scores))
    print("losses:", {k: round(v, 4) for k, v in scores["losses"].items()})
    print("ground truth:", labels, f"(trained in {train_seconds:.0f} s)")
    if not labels["previous_token"] or not labels["induction"]:  # keep the shipped model
        print("no induction circuit found; not writing the model", file=sys.stderr)
        return 1

    meta = {
        "config": {**CONFIG, "seed": args.seed},
        "ground_truth": labels,
        "scores": {
            k: [[round(x, 4) for x in row] for row in scores[k].tolist()]
            for k in ("previous_token", "induction", "ablation", "ov_norm")
        },
        "losses": scores["losses"],
        "thresholds": {"score": SCORE_THRESHOLD, "ablation_nats": ABLATION_THRESHOLD},
        "data": {"bos": BOS, "periods": list(PERIODS), "tokens": [1, CONFIG["d_vocab"] - 1]},
        "training": {
            "steps": args.steps, "seed": args.seed, "batch": args.batch, "lr": args.lr,
            "weight_decay": args.weight_decay, "head_l1": args.head_l1,
            "head_prices": head_prices(args.seed).int().tolist(),
            "optimizer": "AdamW(betas=(0.9, 0.98))",
            "schedule": "linear warmup 5%, cosine decay", "loss": "next-token CE, all positions",
            "seconds": round(train_seconds, 1), "log": log,
            "transformer_lens": importlib.metadata.version("transformer-lens"),
            "torch": torch.__version__,
        },
        "script": "scripts/train_embedded.py",
    }  # fmt: skip
    write_tensors(args.out / "induction-2l.safetensors", state)
    write_json(args.out / "induction-2l.json", meta)
    print(f"wrote {args.out / 'induction-2l.safetensors'} and {args.out / 'induction-2l.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
