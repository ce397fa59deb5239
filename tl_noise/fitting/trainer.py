"""Fitting noise: make it as large as possible while the model's behaviour is preserved.

Each step draws a batch, runs the model once with noise (the clean next-token distributions for
the KL target are cached or computed without gradients), and computes two gradients with respect
to the noise parameters only:

* ``t``: of the task loss, one backward pass through the frozen model (activations only);
* ``n``: of the noise loss, which depends on the noise parameters alone, so autograd over the
  small rho graph costs next to nothing.

They are combined according to ``mode``:

* ``"composite"``: ``g = alpha * n + (1 - alpha) * t``;
* ``"alphaless"``: ``g = S + (L - proj_S(L))`` with S, L the smaller/larger of (n, t)
  (:func:`tl_noise.projection.alphaless_gradients`), no alpha to tune;
* ``"budget"``: ``g = n + w * t`` with ``w = max(0, lambda + (L_task / budget - 1))``: a
  Lagrange multiplier adapted by dual ascent ``log lambda += budget_lr * (EMA(L_task) / budget -
  1)`` plus a damping term (Platt & Barr, 1988) that pushes back as soon as the task loss
  overshoots, so the task loss settles at the budget the user accepts (e.g. KL <= 0.05).

The same per-step quantities feed the run directory (:mod:`tl_noise.runs.reader`).
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor
from tqdm.auto import tqdm

from tl_noise.devices import model_device
from tl_noise.fitting import distributed
from tl_noise.fitting.objectives import (
    NOISE_LOSSES,
    clean_distribution,
    cross_entropy,
    kl_divergence_from_probs,
    next_token_mask,
    noise_loss,
    resolve_objective,
)
from tl_noise.fitting.projection import alphaless_gradients, equivalent_alpha_and_scaling_factor_of
from tl_noise.hooks import NoiseHooks, check_model, check_tokens, head_importance, model_fingerprint
from tl_noise.models import model_name
from tl_noise.ranking import rank_heads
from tl_noise.runs.format import GRAD_KEYS
from tl_noise.runs.writer import RunWriter, latest_checkpoint, read_trainer_state
from tl_noise.tasks.base import Task

MODES = ("alphaless", "composite", "budget")
LOG_LAMBDA_MAX = math.log(1e4)
BUDGET_DAMPING = 1.0


@dataclass
class FitResult:
    """What :func:`fit` returns: final stds (as ``noise.stds()``), the per-step history (the
    records written to ``history.jsonl``), head importance ``[n_layers, n_heads]`` and the run
    directory (or None)."""

    stds: dict[str, Tensor]
    history: list[dict[str, Any]]
    importance: Tensor | None = None
    run_dir: Path | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}={value!r}; expected an int > 0")
    return value


def _check_inputs(
    model: Any, noise: NoiseHooks, tokens: Tensor, loss_mask: Tensor | None
) -> Tensor:
    check_model(model)
    if not isinstance(noise, NoiseHooks):
        raise TypeError(
            f"noise must be NoiseHooks from tl_noise.attach_noise, got {type(noise).__name__}"
        )
    if noise.model is not model:
        raise ValueError("noise is attached to a different model than the one passed to fit")
    check_tokens(model, tokens)
    if loss_mask is None:
        return torch.ones_like(tokens, dtype=torch.bool)
    if (
        not isinstance(loss_mask, Tensor)
        or loss_mask.dtype != torch.bool
        or loss_mask.shape != tokens.shape
    ):
        raise ValueError(
            f"loss_mask must be a bool tensor of shape {list(tokens.shape)}, got "
            f"{getattr(loss_mask, 'dtype', type(loss_mask))} "
            f"{list(getattr(loss_mask, 'shape', []))}"
        )
    if loss_mask.device.type == "meta":
        raise ValueError("loss_mask is on the meta device (no data); pass a real bool mask")
    if not loss_mask.any():
        raise ValueError("loss_mask selects no position: nothing to preserve")
    return loss_mask


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63 - 1))


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> Tensor:
    """Examples of step ``step``: a function of (seed, step) alone, so a resumed run sees the
    same batches as an uninterrupted one."""
    gen = _step_generator(seed, step)
    if batch_size >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=gen)[:batch_size]


class CleanTargets:
    """Clean next-token distributions at masked positions, cached while under a budget.

    Stored as float32 probabilities ``p`` (one block of rows per example) and the row sums
    ``sum_v p log p`` (:func:`tl_noise.objectives.clean_distribution`), which is what
    :func:`tl_noise.objectives.kl_divergence_from_probs` needs: a step pays for no ``exp`` of the
    clean distribution and no concatenation of the cached rows. When the dataset's rows exceed
    ``cache_mb``, each batch's targets are computed once, without gradients, in the step. The
    cache is built in chunks of ``chunk`` examples, so building it needs no more memory than a
    step.
    """

    def __init__(
        self,
        model: Any,
        noise: NoiseHooks,
        tokens: Tensor,
        mask: Tensor,
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
        with self.noise.switched_off():
            logits = self.model(self.tokens[idx].to(model_device(self.model)))
        return clean_distribution(_masked_rows(logits, self.mask[idx].to(logits.device)))

    def __call__(self, idx: Tensor) -> tuple[list[Tensor], Tensor]:
        """``(probability row blocks, sum p log p per row)`` of the examples ``idx``."""
        if self.cache is not None:
            pieces = [self.cache[i] for i in idx.tolist()]
            return [p for p, _ in pieces], torch.cat([h for _, h in pieces])
        probs, neg_entropy = self._compute(idx)
        return [probs], neg_entropy


def _masked_rows(logits: Tensor, mask: Tensor) -> Tensor:
    """``logits[mask]`` as ``[rows, vocab]``; a view, not a copy, when the mask selects all."""
    if bool(mask.all()):
        return logits.reshape(-1, logits.shape[-1])
    return logits[mask]


def _per_head_stats(
    noise: NoiseHooks, n: dict[int, Tensor], t: dict[int, Tensor], g: dict[int, Tensor]
) -> dict[str, Any]:
    """Per hook and head: gradient norms, cosine, signed sums, the projected gradient and the
    alpha/scale the alphaless rule gives on that head alone."""
    stats = _per_head_tensors(noise, n, t, g)
    host = {name: value.cpu().tolist() for name, value in stats.items()}
    return {name: _head_stats_dict(rows) for name, rows in host.items()}


_HEAD_STATS = GRAD_KEYS  # the per-head gradient fields of a history record


def _head_stats_dict(rows: list[list[float]]) -> dict[str, Any]:
    out = dict(zip(_HEAD_STATS, rows, strict=True))
    out["alpha"] = [_json_float(x) for x in out["alpha"]]
    return out


def _per_head_tensors(
    noise: NoiseHooks, n: dict[int, Tensor], t: dict[int, Tensor], g: dict[int, Tensor]
) -> dict[str, Tensor]:
    """Hook -> ``[len(_HEAD_STATS), heads]`` float32 on the layer's device, without a sync.

    Hooks whose gradients have the same shape and device are stacked and computed together, so
    the number of tensor operations grows with the number of distinct shapes, not of hooks.
    """
    groups: dict[tuple[Any, ...], list[tuple[str, Tensor, Tensor, Tensor]]] = {}
    for name, layer in noise.items():
        if layer.rhos is None or layer.granularity not in ("head", "head_feature"):
            continue
        key = id(layer.rhos)
        heads = layer.unit_shape[0]
        nn_, tt, gg = (d[key].float() for d in (n, t, g))
        if layer.n_positions is not None:  # sum positions: [pos, heads, ...] -> [heads, ...]
            nn_, tt, gg = nn_.sum(0), tt.sum(0), gg.sum(0)
        nn_, tt, gg = (x.reshape(heads, -1) for x in (nn_, tt, gg))
        groups.setdefault((nn_.device, *nn_.shape), []).append((name, nn_, tt, gg))
    out: dict[str, Tensor] = {}
    for members in groups.values():
        nn_, tt, gg = (torch.stack([m[i] for m in members]) for i in (1, 2, 3))
        n_norm, t_norm = nn_.norm(dim=-1), tt.norm(dim=-1)
        dot = (nn_ * tt).sum(-1)
        cosine = dot / (n_norm * t_norm).clamp_min(1e-30)
        n_larger = n_norm >= t_norm
        smaller_sq = torch.where(n_larger, t_norm, n_norm).pow(2)
        c = torch.where(smaller_sq > 0, dot / smaller_sq.clamp_min(1e-30), torch.zeros_like(dot))
        a = torch.where(n_larger, torch.ones_like(c), 1 - c)
        b = torch.where(n_larger, 1 - c, torch.ones_like(c))
        scale = a + b
        alpha = torch.where(
            scale != 0, a / torch.where(scale != 0, scale, 1), torch.sign(a) * math.inf
        )
        columns = (n_norm, t_norm, cosine, nn_.sum(-1), tt.sum(-1), gg.sum(-1))
        table = torch.stack([*columns, gg.norm(dim=-1), alpha, scale], dim=1)
        out.update((m[0], table[i]) for i, m in enumerate(members))
    return out


def _json_float(x: float) -> float | str:
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf" if x < 0 else "nan")


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("tl-noise", "torch", "transformer-lens", "transformers"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def fit(
    model: Any,
    noise: NoiseHooks,
    tokens: Int[Tensor, "n pos"] | Task,
    loss_mask: Bool[Tensor, "n pos"] | None = None,
    objective: str | Callable[[Tensor, dict[str, Tensor]], Tensor] = "kl",
    mode: str = "alphaless",
    alpha: float = 0.5,
    budget: float | None = None,
    steps: int = 500,
    lr: float = 0.05,
    batch_size: int = 32,
    seed: int = 0,
    run_dir: str | Path | None = None,
    resume: bool = False,
    quiet: bool = False,
    noise_loss_kind: str = "neg_log_mean",
    metric: Callable[[Tensor, dict[str, Tensor]], Tensor] | None = None,
    checkpoint_every: int = 50,
    log_every: int = 1,
    budget_lr: float = 0.05,
    clean_cache_mb: float = 512.0,
    task_info: dict[str, Any] | None = None,
) -> FitResult:
    """Fit the noise of ``noise`` (attached to ``model``) on ``tokens``; the model stays frozen.

    Args:
        tokens: ``[n, pos]`` token ids, or a :class:`~tl_noise.tasks.Task` (its loss mask,
            metric and extras are used unless given explicitly).
        loss_mask: ``[n, pos]`` bool, the positions whose predictions count (None: all).
        objective: ``"kl"`` (clean vs noised next-token distributions), ``"ce"`` (true next
            tokens), ``"metric"`` (the task's metric) or a callable ``metric(logits, batch)``.
        mode: ``"alphaless"`` (default), ``"composite"`` (uses ``alpha``) or ``"budget"``
            (uses ``budget``: the task loss the user accepts).
        steps, lr, batch_size, seed: optimisation settings (Adam on the noise parameters).
        run_dir: write the run directory there (config, history, checkpoints, final noise).
        resume: continue the run in ``run_dir`` from its last checkpoint; the result equals an
            uninterrupted run with the same settings.
        quiet: no progress bar.

    Returns:
        :class:`FitResult` with ``stds``, ``history``, ``importance`` and ``run_dir``.
    """
    task = tokens if isinstance(tokens, Task) else None
    extras: dict[str, Tensor] = {}
    if task is not None:
        tokens, loss_mask = task.tokens, loss_mask if loss_mask is not None else task.loss_mask
        metric = metric or task.metric
        extras = task.extras
        task_info = task_info or {"name": task.name, **task.info}
    mask = _check_inputs(model, noise, tokens, loss_mask)
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; accepted: {', '.join(MODES)}")
    kind, metric_fn = resolve_objective(objective, metric)
    if noise_loss_kind not in NOISE_LOSSES:
        raise ValueError(
            f"noise_loss_kind={noise_loss_kind!r}; accepted: {', '.join(NOISE_LOSSES)}"
        )
    _check_positive_int("steps", steps)
    _check_positive_int("batch_size", batch_size)
    _check_positive_int("checkpoint_every", checkpoint_every)
    _check_positive_int("log_every", log_every)
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr={lr!r}; expected a finite number > 0")
    if mode == "composite" and not (isinstance(alpha, (int, float)) and 0 <= alpha <= 1):
        raise ValueError(f"alpha={alpha!r}; expected a number in [0, 1]")
    if mode == "budget" and not (
        isinstance(budget, (int, float)) and math.isfinite(budget) and budget > 0
    ):
        raise ValueError(f"budget={budget!r}; mode='budget' needs a finite task-loss budget > 0")
    if mode == "budget" and not (
        isinstance(budget_lr, (int, float)) and math.isfinite(budget_lr) and budget_lr > 0
    ):
        raise ValueError(f"budget_lr={budget_lr!r}; expected a finite number > 0")
    if not noise.attached:
        raise ValueError("noise is not attached to the model (call noise.attach() first)")
    # read and check the checkpoint before anything (noise, run directory) is changed
    checkpoint = _read_resume_checkpoint(model, noise, run_dir) if resume else None

    if noise.calibration_source == "random" and not resume:
        noise.calibrate(tokens[: min(64, tokens.shape[0])])

    fit_config = {
        "objective": kind
        if not callable(objective)
        else getattr(objective, "__name__", "callable"),
        "mode": mode,
        "alpha": alpha if mode == "composite" else None,
        "budget": budget if mode == "budget" else None,
        "steps": steps,
        "lr": lr,
        "batch_size": batch_size,
        "seed": seed,
        "noise_loss": noise_loss_kind,
        "n_examples": int(tokens.shape[0]),
        "n_positions": int(tokens.shape[1]),
        "budget_lr": budget_lr if mode == "budget" else None,
    }
    ctx = distributed.setup()
    writer = None
    if run_dir is not None and ctx.is_main:
        config = {
            "model": {
                "name": model_name(model),
                "fingerprint": model_fingerprint(model),
                "ground_truth": getattr(model, "ground_truth", None),
            },
            "hooks": noise.hook_names,
            "noise": noise.config(),
            "fit": fit_config,
            "task": task_info or {},
            "versions": _versions(),
            "created": time.time(),
        }
        writer = RunWriter(run_dir, config, resume=resume)

    params = [p for p in noise.parameters() if p.requires_grad]
    if ctx.active and batch_size < ctx.world:
        raise ValueError(f"batch_size={batch_size} must be >= the number of ranks ({ctx.world})")
    optimizer = torch.optim.Adam(noise.param_groups(lr))
    log_lambda = 0.0
    task_ema: float | None = None
    start = 0
    if checkpoint is not None:
        start, state, opt_tensors, loaded = checkpoint
        noise.load_state_dict(loaded.state_dict())
        _load_optimizer(optimizer, state["optimizer"], opt_tensors)
        log_lambda = float(state.get("log_lambda", 0.0))
        task_ema = state.get("task_ema")
        if writer:
            writer.truncate_history(start)

    frozen = [p for p in model.parameters() if p.requires_grad]
    targets = (
        CleanTargets(model, noise, tokens, mask, clean_cache_mb, chunk=min(32, batch_size))
        if kind == "kl"
        else None
    )
    device = model_device(model) if targets else next(iter(params)).device
    history: list[dict[str, Any]] = []
    pending: list[dict[str, Any]] = []
    layers = [layer for _, layer in noise.items()]
    has_estimator = any(layer.estimator is not None for layer in layers)
    began = time.time()
    if writer:
        writer.status("running", start)
    bar = tqdm(
        range(start, steps),
        disable=quiet or not ctx.is_main,
        desc="fitting noise",
        initial=start,
        total=steps,
    )
    noise.train()
    try:
        for step in bar:
            idx, offset = distributed.shard(
                batch_indices(tokens.shape[0], batch_size, seed, step), ctx
            )
            if ctx.active:
                noise.set_batch_shard(offset, min(batch_size, tokens.shape[0]))
            batch = {
                "tokens": tokens[idx].to(device),
                "loss_mask": mask[idx].to(device),
                "index": idx,
            }
            batch.update({k: v[idx].to(device) for k, v in extras.items()})
            noise.manual_seed(int(_step_generator(seed, step).initial_seed() % (2**31)))
            # clean targets first: uncached, their transient memory is gone before the noised pass
            clean = targets(idx) if targets is not None else None
            logits = _frozen_forward(model, batch["tokens"], frozen)
            if clean is not None:
                probs, neg_entropy = clean
                rows = _masked_rows(logits, batch["loss_mask"])
                task_loss = kl_divergence_from_probs(probs, neg_entropy, rows)
                terms = float(batch["loss_mask"].sum())
                del clean, probs, neg_entropy, rows
            elif kind == "ce":
                task_loss = cross_entropy(logits, batch["tokens"], batch["loss_mask"])
                terms = float(next_token_mask(batch["loss_mask"])[:, :-1].sum())
            else:
                task_loss = metric_fn(logits, batch)
                terms = float(len(idx))
            del logits  # the loss graph keeps what its backward needs; the logits can go now
            n_loss = noise_loss([layer.std_for_loss() for layer in layers], noise_loss_kind)
            lam = math.exp(log_lambda)
            g_noise = _grads(n_loss, params, retain=has_estimator)
            g_task = _grads(task_loss, params, retain=False) if torch.isfinite(task_loss) else None
            # a rank's shard counts in proportion to its loss terms (masked rows or examples)
            weight = terms / distributed.all_sum(terms, ctx, device) if ctx.active else 1.0
            task_value = distributed.all_sum(task_loss.item() * weight, ctx, device)
            if not (math.isfinite(task_value) and torch.isfinite(n_loss) and g_task is not None):
                msg = (
                    f"non-finite loss at step {step} (task {task_value}, noise {n_loss.item()}); "
                    "the noise parameters were left at the last finite step"
                )
                if writer:
                    writer.status("failed", step, msg + "; the last good checkpoint is kept")
                raise FloatingPointError(msg)
            g_task = distributed.weighted_sum(g_task, weight, ctx)
            if has_estimator:
                g_noise = distributed.weighted_sum(g_noise, len(idx) / batch_size, ctx)
            task_loss = torch.tensor(task_value)
            if mode == "alphaless":  # on the concatenated vector: a few ops, however many hooks
                g = _unflat(alphaless_gradients([_flat(g_noise)], [_flat(g_task)])[0], g_noise)
            elif mode == "composite":
                g = [alpha * a + (1 - alpha) * b for a, b in zip(g_noise, g_task, strict=True)]
            else:
                # damped multiplier (Platt & Barr 1988): the constraint pushes back at once when the
                # task loss overshoots, instead of waiting for lambda to grow
                weight = max(0.0, lam + BUDGET_DAMPING * (task_value / budget - 1))
                g = [a + weight * b for a, b in zip(g_noise, g_task, strict=True)]
            for p, grad in zip(params, g, strict=True):
                p.grad = grad
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if mode == "budget":
                # dual ascent on log lambda, driven by a smoothed task loss
                task_ema = task_value if task_ema is None else 0.9 * task_ema + 0.1 * task_value
                error = task_ema / budget - 1
                log_lambda = min(
                    LOG_LAMBDA_MAX, max(-LOG_LAMBDA_MAX, log_lambda + budget_lr * error)
                )

            record_due = (step % log_every == 0) or step == steps - 1
            if record_due:
                record = _record(
                    step, noise, params, g_noise, g_task, g, task_loss, n_loss, mode, alpha, lam
                )
                history.append(record)
                pending.append(record)
                bar.set_postfix(
                    task=f"{record['loss']['task']:.4g}",
                    noise=f"{record['loss']['noise']:.3g}",
                    std=f"{record['mean_std']:.3g}",
                )
            done = step + 1
            if writer and (done % checkpoint_every == 0 or done == steps):
                writer.append_history(pending)
                pending = []
                writer.checkpoint(
                    done,
                    noise.save,
                    {
                        "optimizer": _optimizer_meta(optimizer),
                        "log_lambda": log_lambda,
                        "task_ema": task_ema,
                    },
                    _optimizer_tensors(optimizer),
                )
                writer.status("running" if done < steps else "completed", done)
    except BaseException as err:
        # Ctrl-C, a full disk, ...: say so in status.json; the last checkpoint stays intact
        if writer and not isinstance(err, FloatingPointError):
            state = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
            try:
                writer.status(
                    state, int(locals().get("step", start)), f"{type(err).__name__}: {err}"
                )
            except OSError:
                pass
        raise
    bar.close()
    noise.clear_batch_shard()
    noise.train()
    stds = noise.stds()
    importance = _safe_importance(noise)
    result = FitResult(
        stds=stds,
        history=history,
        importance=importance,
        run_dir=writer.path if writer else None,
        seconds=time.time() - began,
    )
    if writer:
        writer.append_history(pending)
        summary = {
            "importance": importance.tolist() if importance is not None else None,
            "ranking": rank_heads(importance),
            "seconds": result.seconds,
            "final_loss": history[-1]["loss"] if history else None,
        }
        writer.write_final(noise.save, summary)
        writer.status("completed", steps)
    return result


def _read_resume_checkpoint(
    model: Any, noise: NoiseHooks, run_dir: str | Path | None
) -> tuple[int, dict[str, Any], dict[str, Tensor], NoiseHooks]:
    """``(step, trainer state, optimizer tensors, saved noise)`` of the checkpoint a resumed fit
    starts from; ValueError naming the run when it is missing, unreadable or for other noise."""
    if run_dir is None:
        raise ValueError("resume=True needs run_dir, the directory of the run to continue")
    found = latest_checkpoint(run_dir)
    if found is None:
        raise ValueError(f"resume=True but {str(run_dir)!r} has no checkpoint yet")
    start, folder = found
    state, opt_tensors = read_trainer_state(folder)
    loaded = NoiseHooks.load(folder, model, attach=False)
    theirs = json.loads(json.dumps(loaded.config()["hooks"]))
    ours = json.loads(json.dumps(noise.config()["hooks"]))
    problems = []
    for name in dict.fromkeys(loaded.hook_names + noise.hook_names):
        a, b = theirs.get(name), ours.get(name)
        if a is None or b is None:
            problems.append(f"{name}: {'not in the run' if a is None else 'not in this noise'}")
            continue
        problems += [f"{name}.{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
                     if a.get(k) != b.get(k)]  # fmt: skip
    if not problems and loaded.hook_names != noise.hook_names:
        problems.append(f"hook order {loaded.hook_names} -> {noise.hook_names}")
    if problems:
        raise ValueError(
            f"cannot resume {str(run_dir)!r} with different noise: {'; '.join(problems)}"
        )
    return start, state, opt_tensors, loaded


def _grads(loss: Tensor, params: list[Tensor], retain: bool) -> list[Tensor]:
    grads = torch.autograd.grad(loss, params, retain_graph=retain, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


def _record(
    step, noise, params, g_noise, g_task, g, task_loss, n_loss, mode, alpha, lam
) -> dict[str, Any]:
    """One history record (format in :mod:`tl_noise.runs.reader`), with one device->host copy per
    device: every number is computed where it lives, gathered and copied once."""
    with torch.no_grad():
        eq_alpha, eq_scale = equivalent_alpha_and_scaling_factor_of(
            [_flat(g_noise)], [_flat(g_task)]
        )
        by_id = {id(p): i for i, p in enumerate(params)}
        n = {id(p): g_noise[by_id[id(p)]] for p in params}
        t = {id(p): g_task[by_id[id(p)]] for p in params}
        gg = {id(p): g[by_id[id(p)]] for p in params}
        stds = {name: layer.std().detach().float() for name, layer in noise.items()}
        heads = _per_head_tensors(noise, n, t, gg)
        loss = n_loss.detach().float().to(eq_alpha.device)
        scalars = torch.stack([eq_alpha.float(), eq_scale.float(), loss])
        first = next(iter(stds.values())).device
        parts = {
            "scalars": scalars,
            "mean_std": torch.cat([s.reshape(-1).to(first) for s in stds.values()]).mean(),
            **{f"std:{k}": v for k, v in stds.items()},
            **{f"grad:{k}": v for k, v in heads.items()},
        }
        host = _to_host(parts)
    eq_a, eq_s, nl = host["scalars"]
    tl = task_loss.item()
    total = {
        "alphaless": tl + nl,
        "composite": alpha * nl + (1 - alpha) * tl,
        "budget": nl + lam * tl,
    }[mode]
    return {
        "step": step,
        "loss": {
            "task": tl,
            "noise": nl,
            "total": total,
            "lambda": lam if mode == "budget" else None,
        },
        "mean_std": host["mean_std"],
        "equivalent": {"alpha": _json_float(eq_a), "scale": eq_s},
        "std": {name: host[f"std:{name}"] for name in stds},
        "grad": {name: _head_stats_dict(host[f"grad:{name}"]) for name in heads},
    }


def _to_host(parts: dict[str, Tensor]) -> dict[str, Any]:
    """``tensor.tolist()`` of every part, with one copy per device (parts keep their shapes)."""
    by_device: dict[torch.device, list[str]] = {}
    for key, value in parts.items():
        by_device.setdefault(value.device, []).append(key)
    out: dict[str, Any] = {}
    for keys in by_device.values():
        flat = torch.cat([parts[k].reshape(-1).float() for k in keys]).cpu()
        for key, piece in zip(keys, flat.split([parts[k].numel() for k in keys]), strict=True):
            out[key] = piece.reshape(parts[key].shape).tolist()
    return out


def _unflat(flat: Tensor, like: list[Tensor]) -> list[Tensor]:
    """Split a vector from :func:`_flat` back into tensors shaped like ``like``."""
    if len(like) == 1:
        return [flat.reshape(like[0].shape)]
    pieces = flat.split([x.numel() for x in like])
    return [piece.reshape(x.shape) for piece, x in zip(pieces, like, strict=True)]


def _frozen_forward(model: Any, tokens: Tensor, frozen: list[Tensor]) -> Tensor:
    """``model(tokens)`` with the weights in ``frozen`` not requiring grad during the call.

    The graph then starts at the first noise layer and saves nothing for weight gradients
    (less memory, no weight-gradient work in the backward); the flags are restored at once.
    """
    for p in frozen:
        p.requires_grad_(False)
    try:
        return model(tokens)
    finally:
        for p in frozen:
            p.requires_grad_(True)


def _flat(tensors: list[Tensor]) -> Tensor:
    """The concatenation of the flattened tensors (one vector over all noise parameters)."""
    return torch.cat([x.reshape(-1) for x in tensors]) if len(tensors) > 1 else tensors[0]


def _optimizer_meta(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    state = optimizer.state_dict()
    meta = {"param_groups": state["param_groups"], "steps": {}}
    for key, value in state["state"].items():
        meta["steps"][str(key)] = float(value["step"]) if "step" in value else 0.0
    return meta


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
    out = {}
    for key, value in optimizer.state_dict()["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            if name in value:
                out[f"{key}.{name}"] = value[name]
    return out


def _load_optimizer(
    optimizer: torch.optim.Optimizer, meta: dict[str, Any], tensors: dict[str, Tensor]
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, step in meta["steps"].items():
        state[int(key)] = {
            "step": torch.tensor(step),
            "exp_avg": tensors[f"{key}.exp_avg"],
            "exp_avg_sq": tensors[f"{key}.exp_avg_sq"],
        }
    groups = optimizer.state_dict()["param_groups"]
    if len(groups) != len(meta["param_groups"]):
        raise ValueError("the checkpoint's optimizer does not match these noise parameters")
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _safe_importance(noise: NoiseHooks) -> Tensor | None:
    try:
        imp = head_importance(noise)
    except (ValueError, AttributeError):
        return None
    return None if torch.isnan(imp).all() else imp
