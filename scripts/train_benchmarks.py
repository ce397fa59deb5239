"""Train the zoo's benchmark models: small transformers on which attribution methods differ.

Usage::

    .venv/bin/python scripts/train_benchmarks.py --model backup|distractor|mlp|all \\
        [--out tl_noise/zoo/data] [--steps N] [--seed S] [--relabel]

For each model writes ``NAME.safetensors`` (float32 weights in TransformerLens 3.x's canonical
layout, plus the task's tables under ``task.*``) and ``NAME.json`` (the config for
:func:`tl_noise.models.build_native_model`, the task's generation parameters, the training
settings and losses, and the labels: every node's single-node mean-ablation effect, the
pairwise joint effects, per-head scores and the labelled structure). The data generators are
:mod:`tl_noise.zoo.generators`, the same ones the loader's ``Benchmark.task`` uses.
``--relabel`` re-measures and re-labels the files in ``--out`` without training.

Models (3 layers x 4 heads + 3 MLPs = 15 nodes, d_model 64, no LayerNorm, GELU MLPs); the
settings of each are in :data:`MODELS`:

- ``backup``: n-gram text (bigram + skip-bigram tables, rank 8) with a copied span of uniform
  tokens; trained with *head dropout*: each head of each sequence is, with probability
  ``head_drop`` (ramped in over the first 40 % of the steps), replaced by its running mean (mean
  ablation, the perturbation the labels measure) for the whole sequence, and a light group lasso.
  The model learns four redundant copying heads: ablating one costs ~0.1 nats, ablating two
  0.5 - 1.3, all four ~4 (mean-ablating the previous-token heads one or two at a time barely
  matters either).
- ``distractor``: the same copying task, no dropout, inside text with two *topic* tokens at
  positions 1 and 2 whose tables bias every later text token, plus bigram and skip-trigram
  tables. Layer-2 heads read the topics and write a lot at every position, the copied ones
  included, where their writes barely matter.
- ``mlp``: triples ``a b c`` with ``c = latin[a, b]`` (a Latin square; 10 % uniform noise):
  ``a`` and ``b`` alone say nothing about ``c``; layer-0 heads bring ``a`` to ``b``'s position
  and the MLPs compute the entry. Group lasso with unequal prices keeps the circuit small.

Training is plain PyTorch on the canonical weights (the forward pass is TransformerLens'
computation for ``normalization_type=None``; after training the weights are loaded into a
TransformerLens model and its logits are checked against the plain forward pass), AdamW with
warmup and cosine decay, next-token cross-entropy on every position plus ``target_weight`` times
the cross-entropy at the target positions, optionally a group lasso with unequal per-node prices
(:func:`node_prices`). One CPU thread, 2-6 minutes per model on an idle core; deterministic for
a seed and torch version. All labels are measured on the TransformerLens model built from the
written file, on fresh data (seed ``seed + 2``, ``EVAL_N`` sequences).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import itertools
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from tl_noise.io import read_json, read_tensors, write_json, write_tensors
from tl_noise.models import build_native_model
from tl_noise.zoo import TASK_PREFIX, benchmark_metric, load_weights
from tl_noise.zoo.generators import generate, latin_square, ngram_tables, text_mask

BASE = dict(
    n_layers=3, d_model=64, n_heads=4, d_head=16, d_mlp=128, act_fn="gelu",
    normalization_type=None, positional_embedding_type="standard",
)  # fmt: skip
MODELS: dict[str, dict[str, Any]] = {
    "backup": dict(
        config=dict(d_vocab=96, n_ctx=40),
        data=dict(kind="copy", span=[6, 12], scales=[2.0, 1.5], rank=8),
        train=dict(steps=4000, head_drop=0.3, drop_ramp=0.4, l1=1e-2, l1_start=0.25,
                   target_weight=1.0, lr=3e-3),
    ),
    "distractor": dict(
        config=dict(d_vocab=96, n_ctx=40),
        data=dict(kind="copy", span=[6, 12], scales=[1.5, 0.0, 1.5], anchors=[3.0, 3.0], rank=8),
        train=dict(steps=4000, head_drop=0.0, drop_ramp=0.0, l1=0.0, l1_start=0.0,
                   target_weight=1.0, lr=1e-2),
    ),
    "mlp": dict(
        config=dict(d_vocab=37, n_ctx=31),
        data=dict(kind="lookup", order=12, noise=0.1),
        train=dict(steps=2000, head_drop=0.0, drop_ramp=0.0, l1=5e-2, l1_start=0.25,
                   target_weight=1.0, lr=3e-3),
    ),
}  # fmt: skip
BATCH = 64
CHUNK = 16  # batches generated at once
EVAL_N = 512
WEIGHT_DECAY = 0.1
L1_RAMP = 0.35  # the penalty grows from l1_start to l1_start + 35 % of the steps
MLP_PRICE = 0.2  # an MLP's weight norms are ~5x a head's OV norm at the same importance
EMA = 0.98  # running mean of each head's z for head dropout


# --------------------------------------------------------------------------- the model
def init_params(cfg: dict[str, Any], seed: int) -> dict[str, Tensor]:
    """Canonical (TransformerLens 3.x) weights, normal(0, 0.8 / sqrt(d_model)), biases zero."""
    gen = torch.Generator().manual_seed(seed)
    d, h, e, v, m = cfg["d_model"], cfg["n_heads"], cfg["d_head"], cfg["d_vocab"], cfg["d_mlp"]
    std = 0.8 / math.sqrt(d)

    def w(*shape: int, scale: float = 1.0) -> Tensor:
        return torch.randn(*shape, generator=gen) * std * scale

    p = {"embed.W_E": w(v, d), "pos_embed.W_pos": w(cfg["n_ctx"], d)}
    for layer in range(cfg["n_layers"]):
        a, b = f"blocks.{layer}.attn", f"blocks.{layer}.mlp"
        for x in "QKV":
            p[f"{a}.W_{x}"], p[f"{a}.b_{x}"] = w(h, d, e), torch.zeros(h, e)
        p[f"{a}.W_O"], p[f"{a}.b_O"] = w(h, e, d, scale=0.5), torch.zeros(d)
        p[f"{b}.W_in"], p[f"{b}.b_in"] = w(d, m), torch.zeros(m)
        p[f"{b}.W_out"], p[f"{b}.b_out"] = w(m, d, scale=0.5), torch.zeros(d)
    p["unembed.W_U"], p["unembed.b_U"] = w(d, v), torch.zeros(v)
    return {k: t.requires_grad_(True) for k, t in p.items()}


def forward(
    p: dict[str, Tensor], tokens: Tensor, cfg: dict[str, Any],
    drop: Tensor | None = None, means: Tensor | None = None, z_out: list | None = None,
) -> Tensor:  # fmt: skip
    """TransformerLens' forward pass (no LayerNorm); ``drop: [b, n_layers, n_heads]`` replaces
    those heads' ``z`` by ``means[layer, head]`` at every position."""
    (n, n_pos), h, e = tokens.shape, cfg["n_heads"], cfg["d_head"]
    x = p["embed.W_E"][tokens] + p["pos_embed.W_pos"][:n_pos]
    for layer in range(cfg["n_layers"]):
        a, b = f"blocks.{layer}.attn", f"blocks.{layer}.mlp"
        w_qkv = torch.cat([p[f"{a}.W_{c}"] for c in "QKV"], dim=0)  # [3h, d, e]
        b_qkv = torch.cat([p[f"{a}.b_{c}"] for c in "QKV"], dim=0).reshape(-1)
        qkv = x @ w_qkv.permute(1, 0, 2).reshape(x.shape[-1], -1) + b_qkv  # [n, pos, 3 h e]
        q, k, v = qkv.reshape(n, n_pos, 3, h, e).permute(2, 0, 3, 1, 4)  # [n, h, pos, e] each
        z = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)  # [n,pos,h,e]
        if z_out is not None:
            z_out.append(z)
        if drop is not None and means is not None:
            z = torch.where(drop[:, layer, None, :, None], means[layer][None, None], z)
        x = x + z.reshape(n, n_pos, h * e) @ p[f"{a}.W_O"].reshape(h * e, -1) + p[f"{a}.b_O"]
        hidden = F.gelu(x @ p[f"{b}.W_in"] + p[f"{b}.b_in"])
        x = x + hidden @ p[f"{b}.W_out"] + p[f"{b}.b_out"]
    return x @ p["unembed.W_U"] + p["unembed.b_U"]


def losses(logits: Tensor, tokens: Tensor) -> Tensor:
    """Cross-entropy of token ``t + 1`` at every position ``t`` (last column padded with 0)."""
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")
    return F.pad(ce, (0, 1))


# --------------------------------------------------------------------------- data
def task_tables(spec: dict[str, Any], cfg: dict[str, Any], seed: int) -> dict[str, Tensor]:
    """The task's random tables (stored in the safetensors file under ``task.``)."""
    gen = torch.Generator().manual_seed(seed + 10)
    data = spec["data"]
    if data["kind"] == "copy":
        tables = {"ngram": ngram_tables(cfg["d_vocab"], data["scales"], data["rank"], gen)}
        if data.get("anchors"):
            tables["anchor"] = ngram_tables(cfg["d_vocab"], data["anchors"], data["rank"], gen)
        return tables
    return {"latin": latin_square(data["order"], gen)}


# --------------------------------------------------------------------------- training
def node_norms(p: dict[str, Tensor], cfg: dict[str, Any]) -> Tensor:
    """Per node (heads in order, then MLPs): ``||W_V W_O||_F`` of a head,
    ``MLP_PRICE * (||W_in||_F + ||W_out||_F) / 2`` of an MLP (differentiable)."""
    heads = [torch.linalg.matrix_norm(p[f"blocks.{lay}.attn.W_V"] @ p[f"blocks.{lay}.attn.W_O"])
             for lay in range(cfg["n_layers"])]  # fmt: skip
    mlps = [MLP_PRICE * (p[f"blocks.{lay}.mlp.W_in"].norm() + p[f"blocks.{lay}.mlp.W_out"].norm())
            / 2 for lay in range(cfg["n_layers"])]  # fmt: skip
    return torch.cat([torch.cat(heads), torch.stack(mlps)])


def node_prices(cfg: dict[str, Any], seed: int) -> Tensor:
    """Group-lasso weights: per layer a seeded permutation of ``1 .. n_heads`` for the heads,
    a seeded permutation of ``1 .. n_layers`` for the MLPs. A uniform group lasso is
    indifferent between one node doing a job and several sharing it; unequal prices break the
    tie, so each role ends up with the fewest (cheapest) nodes that can carry it."""
    gen = torch.Generator().manual_seed(seed + 3)
    n_layers, n_heads = cfg["n_layers"], cfg["n_heads"]
    heads = [1.0 + torch.randperm(n_heads, generator=gen) for _ in range(n_layers)]
    return torch.cat([*heads, 1.0 + torch.randperm(n_layers, generator=gen)])


def train(name: str, seed: int, steps: int) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Fit one model; returns canonical weights and a record of the run."""
    spec = MODELS[name]
    cfg = {**BASE, **spec["config"]}
    tr = spec["train"]
    torch.manual_seed(seed)
    params = init_params(cfg, seed)
    tables = task_tables(spec, cfg, seed)
    opt = torch.optim.AdamW(params.values(), lr=tr["lr"], weight_decay=WEIGHT_DECAY,
                            betas=(0.9, 0.98))  # fmt: skip
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    n_layers, n_heads = cfg["n_layers"], cfg["n_heads"]
    means = torch.zeros(n_layers, n_heads, cfg["d_head"])
    prices = node_prices(cfg, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    log = []
    for step in range(steps):
        if step % CHUNK == 0:  # generating many sequences at once is much faster
            data_seed = int(torch.randint(0, 2**62, (1,), generator=gen))
            pool = generate(spec["data"], tables, BATCH * CHUNK, data_seed, cfg["n_ctx"])
        rows = slice((step % CHUNK) * BATCH, (step % CHUNK + 1) * BATCH)
        tokens, mask = pool[0][rows], pool[1][rows]
        ramp = min(1.0, step / (tr["drop_ramp"] * steps)) if tr["drop_ramp"] else 1.0
        drop = torch.rand(BATCH, n_layers, n_heads, generator=gen) < tr["head_drop"] * ramp
        zs: list[Tensor] = []
        ce = losses(forward(params, tokens, cfg, drop, means, zs), tokens)
        target = ce[mask].mean()
        loss = ce[:, :-1].mean() + tr["target_weight"] * target
        penalty = 0.0
        if tr["l1"]:  # group lasso with unequal prices, ramped in once the circuit has formed
            price_ramp = min(1.0, max(0.0, (step / steps - tr["l1_start"]) / L1_RAMP))
            penalty = tr["l1"] * price_ramp * (prices * node_norms(params, cfg)).sum()
        opt.zero_grad(set_to_none=True)
        (loss + penalty).backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            batch_mean = torch.stack([z.mean((0, 1)) for z in zs])
            means = batch_mean if step == 0 else EMA * means + (1 - EMA) * batch_mean
        if step % 250 == 0 or step == steps - 1:
            log.append([step, round(loss.item(), 4), round(target.item(), 4)])
            print(f"{name} step {step:5d}  loss {loss.item():.4f}  target {target.item():.4f}",
                  flush=True)  # fmt: skip
    weights = {k: v.detach().float().contiguous() for k, v in params.items()}
    record = dict(cfg=cfg, tables=tables, log=log, prices=prices.tolist())
    return weights, record


# --------------------------------------------------------------------------- scoring
def node_names(n_layers: int, n_heads: int) -> list[str]:
    """MIB node names: ``a{l}.h{h}`` for every head, then ``m{l}`` for every MLP."""
    heads = [f"a{lay}.h{h}" for lay in range(n_layers) for h in range(n_heads)]
    return heads + [f"m{lay}" for lay in range(n_layers)]


def ablation_hooks(nodes: list[str], means: dict[str, Tensor]) -> list:
    """Hooks that mean-ablate ``nodes`` (heads on ``hook_z``, MLPs on ``hook_mlp_out``)."""
    heads: dict[int, list[int]] = {}
    hooks = []
    for node in nodes:
        if node.startswith("a"):
            lay, h = node[1:].split(".h")
            heads.setdefault(int(lay), []).append(int(h))
        else:
            name = f"blocks.{node[1:]}.hook_mlp_out"
            hooks.append((name, lambda x, hook, m=means[name]: m.expand_as(x).clone()))
    for lay, hs in heads.items():
        name = f"blocks.{lay}.attn.hook_z"

        def hook(z: Tensor, hook: Any, hs: list[int] = hs, m: Tensor = means[name]) -> Tensor:
            z = z.clone()
            z[:, :, hs] = m[hs]
            return z

        hooks.append((name, hook))
    return hooks


def measure(
    model: Any, tokens: Tensor, mask: Tensor, layout: Tensor, n_anchors: int = 0
) -> dict[str, Any]:
    """Single-node and pairwise mean-ablation effects on the task metric, single-node effects on
    the text positions' loss (copy tasks), per-head attention and write scores."""
    cfg = model.cfg
    names = node_names(cfg.n_layers, cfg.n_heads)
    batch = {"tokens": tokens, "loss_mask": mask}
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
        clean = benchmark_metric(logits, batch).item()
        means = {k: v.mean((0, 1)) for k, v in cache.items()
                 if k.endswith(("attn.hook_z", "hook_mlp_out"))}  # fmt: skip

        text = (
            {"tokens": tokens, "loss_mask": text_mask(layout, tokens.shape[1])}
            if (layout.shape[1] == 3)
            else None
        )
        clean_text = benchmark_metric(logits, text).item() if text else 0.0
        text_effect: dict[str, float] = {}

        def ablated(nodes: list[str]) -> float:
            out = model.run_with_hooks(tokens, fwd_hooks=ablation_hooks(nodes, means))
            if text and len(nodes) == 1:
                text_effect[nodes[0]] = benchmark_metric(out, text).item() - clean_text
            return benchmark_metric(out, batch).item() - clean

        single = {n: ablated([n]) for n in names}
        pairs = {f"{a}+{b}": ablated([a, b]) for a, b in itertools.combinations(names, 2)}
        empty = ablated(names)
        heads_only = ablated([n for n in names if n.startswith("a")])
        scores = head_scores(model, cache, tokens, mask, layout, n_anchors)
        for node, effect in text_effect.items():
            scores.setdefault(node, {})["text_ablation"] = round(effect, 4)
    return dict(clean=clean, single=single, pairs=pairs, all_ablated=empty,
                all_heads_ablated=heads_only, heads=scores)  # fmt: skip


def head_scores(
    model: Any, cache: Any, tokens: Tensor, mask: Tensor, layout: Tensor, n_anchors: int = 0
) -> dict[str, dict[str, float]]:
    """Per head: attention to ``t - 1`` and ``t - 2`` (all positions), to ``t - 1`` at the target
    positions, to the token after the source copy of ``t`` (target positions, copy tasks), to
    the topic tokens ``1 .. n_anchors`` (from the later positions), and the RMS of its centred
    output ``(z - mean z) W_O`` at the target positions and at all
    positions."""
    cfg = model.cfg
    n, n_pos = tokens.shape
    out: dict[str, dict[str, float]] = {}
    rows = torch.arange(n)[:, None].expand(n, n_pos)
    t = torch.arange(n_pos)[None, :].expand(n, n_pos)
    for lay in range(cfg.n_layers):
        pattern = cache[f"blocks.{lay}.attn.hook_pattern"]  # [b, h, q, k]
        z = cache[f"blocks.{lay}.attn.hook_z"]
        w_o = model.blocks[lay].attn.W_O  # [h, e, d]
        write = torch.einsum("bphe,hed->bphd", z - z.mean((0, 1)), w_o).norm(dim=-1)
        for h in range(cfg.n_heads):
            pat = pattern[:, h]
            prev = pat.diagonal(-1, -2, -1)[:, 1:].mean().item()
            prev2 = pat.diagonal(-2, -2, -1)[:, 1:].mean().item()
            at_target = pat[:, 1:, :-1].diagonal(0, -2, -1)[mask[:, 1:]].mean().item()
            entry = {"previous_token": prev, "two_back": prev2, "previous_token_target": at_target,
                     "write_rms_target": write[:, :, h][mask].pow(2).mean().sqrt().item(),
                     "write_rms_all": write[:, :, h].pow(2).mean().sqrt().item()}  # fmt: skip
            if n_anchors:
                entry["topic"] = pat[:, n_anchors + 1 :, 1 : n_anchors + 1].sum(-1).mean().item()
            if layout.shape[1]:
                key = (t - (layout[:, 1:2] - layout[:, 0:1]) + 1).clamp(0, n_pos - 1)
                entry["induction"] = pat[rows[mask], t[mask], key[mask]].mean().item()
            out[f"a{lay}.h{h}"] = {k: round(v, 4) for k, v in entry.items()}
    return out


def check_against_tl(model: Any, weights: dict[str, Tensor], cfg: dict, tokens: Tensor) -> float:
    """Max |logit difference| between the TransformerLens model and the plain forward pass."""
    with torch.no_grad():
        ref = forward(weights, tokens, cfg)
        got = model(tokens)
    return (ref - got).abs().max().item()


# --------------------------------------------------------------------------- labels
def label(name: str, m: dict[str, Any]) -> dict[str, list[str]]:
    """The labelled structure of model ``name`` from its measurements."""
    single, pairs, heads = m["single"], m["pairs"], m["heads"]

    def pair(a: str, b: str) -> float:
        return pairs.get(f"{a}+{b}", pairs.get(f"{b}+{a}", 0.0))

    important = [n for n, e in single.items() if e > IMPORTANT]
    if name == "mlp":
        return {"mlp_needed": [n for n in important if n.startswith("m")],
                "heads_needed": [n for n in important if n.startswith("a")],
                "movers": [n for n in important if n.startswith("a")
                           and heads[n]["previous_token_target"] > SCORE]}  # fmt: skip
    head_names = [h for h in heads if h.startswith("a")]
    copying = [h for h in head_names if heads[h].get("induction", 0.0) > SCORE]
    if name == "backup":
        if not copying:
            return {"primary": [], "backup": [], "copying": [], "important": important}
        primary = max(copying, key=lambda h: (single[h], heads[h]["induction"]))
        backup = [h for h in copying if h != primary
                  and pair(primary, h) - max(single[primary], single[h]) > BACKUP_GAIN]  # fmt: skip
        return {"primary": [primary], "backup": backup, "copying": copying,
                "important": important}  # fmt: skip
    circuit_writes = sorted(heads[h]["write_rms_target"] for h in important if h in head_names)
    median_write = circuit_writes[len(circuit_writes) // 2] if circuit_writes else 0.0
    distractor = [h for h in head_names if abs(single[h]) < SMALL
                  and heads[h]["text_ablation"] > BUSY_TEXT
                  and heads[h]["write_rms_target"] > 0.5 * median_write]  # fmt: skip
    return {"circuit": important, "distractor": distractor, "copying": copying}


IMPORTANT = 0.3  # nats: a node whose single ablation costs more is "important"
SMALL = 0.1  # nats: a distractor's single ablation costs less
SCORE = 0.3  # induction attention of a copying head
BACKUP_GAIN = 0.3  # nats: ablating primary + backup costs this much more than either alone
BUSY_TEXT = 0.1  # nats: a distractor's ablation raises the loss on the text positions this much


def format_table(m: dict[str, Any]) -> str:
    """Per node: task effect, text effect, attention scores and write sizes."""
    rows = ["node     ablation  text_abl   prev  two_back  induction  write_target  write_all"]
    nan = float("nan")
    for node, eff in m["single"].items():
        s = m["heads"].get(node, {})
        rows.append(
            f"{node:7s} {eff:9.3f} {s.get('text_ablation', nan):9.3f}  "
            f"{s.get('previous_token', nan):5.2f}  {s.get('two_back', nan):8.2f}  "
            f"{s.get('induction', nan):9.2f}  {s.get('write_rms_target', nan):12.2f}  "
            f"{s.get('write_rms_all', nan):9.2f}"
        )
    return "\n".join(rows)


def run(name: str, seed: int, steps: int | None, out: Path, relabel: bool = False) -> int:
    """Train model ``name`` (or, with ``relabel``, read it from ``out``), label it, write it."""
    spec = MODELS[name]
    if relabel:  # keep the weights and the training record, measure and label again
        old = read_json(out / f"{name}.json", "benchmark description")
        state = read_tensors(out / f"{name}.safetensors", "benchmark weights")
        tables = {k[len(TASK_PREFIX) :]: v for k, v in state.items() if k.startswith(TASK_PREFIX)}
        weights = {k: v for k, v in state.items() if not k.startswith(TASK_PREFIX)}
        cfg, training, seed = old["config"], old["training"], old["training"]["seed"]
    else:
        steps = steps or spec["train"]["steps"]
        start = time.perf_counter()
        weights, rec = train(name, seed, steps)
        seconds = time.perf_counter() - start
        cfg, tables = {**rec["cfg"], "seed": seed}, rec["tables"]
        training = {**spec["train"], "steps": steps, "seed": seed, "batch": BATCH,
                    "weight_decay": WEIGHT_DECAY, "optimizer": "AdamW(betas=(0.9, 0.98))",
                    "schedule": "linear warmup 5%, cosine decay",
                    "loss": "next-token CE on all positions + target_weight * CE at the mask",
                    "head_dropout": "per sequence and head, z replaced by its running mean",
                    "group_lasso": f"l1 * node_prices * norms, ramped in from l1_start over "
                                   f"{L1_RAMP:.0%} of the steps; MLP norms x {MLP_PRICE}",
                    "node_prices": rec["prices"], "seconds": round(seconds, 1),
                    "log": rec["log"], "threads": 1,
                    "transformer_lens": importlib.metadata.version("transformer-lens"),
                    "torch": torch.__version__}  # fmt: skip
        state = {**weights, **{TASK_PREFIX + k: v.contiguous() for k, v in tables.items()}}
        write_tensors(out / f"{name}.safetensors", state)  # labelled below; --relabel redoes it
        write_json(out / f"{name}.json", {"name": name, "config": cfg, "training": training})
    model = build_native_model(cfg)
    load_weights(model, weights)
    model.eval()
    data = dict(spec["data"])
    tokens, mask, _, layout = generate(data, tables, EVAL_N, seed + 2, cfg["n_ctx"])
    diff = check_against_tl(model, weights, cfg, tokens[:64])
    m = measure(model, tokens, mask, layout, len(data.get("anchors", [])))
    structure = label(name, m)
    print(format_table(m))
    print(f"{name}: clean {m['clean']:.4f}, all ablated +{m['all_ablated']:.3f}, all heads "
          f"+{m['all_heads_ablated']:.3f}; TL vs plain max |dlogit| {diff:.2e}; {structure}; "
          f"trained in {training['seconds']:.0f} s")  # fmt: skip
    if diff > 1e-3:
        print("the TransformerLens model does not match the trained one", file=sys.stderr)
        return 1
    nodes = {n: {"mean_ablation": round(e, 4), **m["heads"].get(n, {})}
             for n, e in m["single"].items()}  # fmt: skip
    meta = {
        "name": name,
        "config": cfg,
        "data": {**data, "bos": 0, "n_ctx": cfg["n_ctx"]},
        "labels": {"nodes": nodes, "structure": structure,
                   "pairs": {k: round(v, 4) for k, v in m["pairs"].items()},
                   "thresholds": {"important": IMPORTANT, "small": SMALL, "score": SCORE,
                                  "backup_gain": BACKUP_GAIN, "busy_text": BUSY_TEXT},
                   "ablation": "mean over the eval batch and positions (hook_z / hook_mlp_out); "
                               "effects are increases of the task metric in nats",
                   "eval": {"n": EVAL_N, "seed": seed + 2}},
        "losses": {"clean": m["clean"], "all_ablated": m["clean"] + m["all_ablated"],
                   "all_heads_ablated": m["clean"] + m["all_heads_ablated"]},
        "training": training,
        "script": "scripts/train_benchmarks.py",
    }  # fmt: skip
    state = {**weights, **{TASK_PREFIX + k: v.contiguous() for k, v in tables.items()}}
    write_tensors(out / f"{name}.safetensors", state)
    write_json(out / f"{name}.json", meta)
    print(f"wrote {out / name}.safetensors and .json")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=[*MODELS, "all"], default="all")
    parser.add_argument("--out", type=Path, default=Path("tl_noise/zoo/data"))
    parser.add_argument("--steps", type=int, default=None, help="default: per model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--relabel",
        action="store_true",
        help="re-measure and re-label the models in --out without training",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny models: extra threads only add synchronisation
    names = list(MODELS) if args.model == "all" else [args.model]
    return max(run(name, args.seed, args.steps, args.out, args.relabel) for name in names)


if __name__ == "__main__":
    sys.exit(main())
