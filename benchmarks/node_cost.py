"""Cost of a node-level answer against the number of nodes: tl-noise's default beside the
node baselines, in forward-pass equivalents and wall seconds, on GPT-2-small-shaped models.

Usage (repository root)::

    .venv/bin/python -m benchmarks.node_cost                       # defaults below, ~35 min
    .venv/bin/python -m benchmarks.node_cost --layers 1 2 --slow-max-layers 1   # smoke

**Models.** ``benchmarks.perf.settings.MODELS["gpt2-small"]`` (the shape every cost benchmark
here uses: d_model 768, 12 heads of 64, d_mlp 3072, vocab 50257, n_ctx 1024, LayerNorm, learned
positions; ``act_fn="gelu"``) with ``n_layers`` = each of ``--layers``, built by
``tn.build_native_model`` with random weights (seed 0), eval mode, every parameter frozen.
Nodes: 12 heads + 1 MLP per layer, ``N = 13 L`` = 13, 26, 52, 104, 156 at the default depths.

**Data.** ``--n`` random token rows of ``--pos`` tokens (seed ``--seed``, token 0 as BOS in column
0), ``loss_mask`` True everywhere but column 0, counterfactual = a second random draw (seed + 1).
The defaults are ``--n 4 --pos 4``, not 16 x 32: on random weights the default fit never
stabilises and runs its full 500 steps (1,500 forwards) at every depth, and its refinement cost
3,950 passes at N=156 (elimination 1,219, insertion polish 2,731); at 16 x 32 the L=12 tl-noise
call alone would take over an hour on one thread (a forward 1.7 s, a step ~3.5 s). At 4 x 4 an
L=12 forward is ~0.2 s and mostly reads the weights (4 x 8: 0.27 s, 2 x 4: 0.19 s), so the run
still took 35 min on a 2-core machine shared with two other jobs; the tl-noise calls at L=8 and
12 are 21 of them. Forward counts do not depend on ``n`` or ``pos`` while ``n`` <= 32 (the fit's
and the baselines' batch size; every step then sees every row); only the seconds do.

**What runs** (one CPU thread, ``torch.set_num_threads(--threads)``), per depth:

* ``plain forward``: ``model(tokens)`` without gradients, median of 3 after two warm-ups: the unit
  of the ``/fwd`` column and of every projection.
* ``tl-noise``: the public contract with every default, timed whole (attach included)::

      noise = tn.attach_noise(model, NODE_HOOKS, calibration_tokens=tokens)
      result = tn.fit(model, noise, tokens, loss_mask=mask, quiet=True)
      scores = tn.node_importance(noise); noise.remove()

  reported: ``result.forwards``, the steps run (``len(result.history)``, one record per step at
  the default ``log_every=1``), ``result.stopped_at`` (None: no early stop, the step cap was hit)
  and ``noise.ranking_info`` (the refinement's window, forwards, polish and examples).
* baselines of :data:`tl_noise.evaluation.node_baselines.BASELINES`, called as
  ``benchmarks/quality/methods.py`` calls them, ``BASELINES.get(name)(model, tokens, mask,
  corrupted_tokens=corrupted)``: "mean ablation", "activation patching", "attribution patching
  (TL)" at every depth; "subnetwork probing" and "ibcircuit" (300 optimisation steps each, ~902
  forwards whatever N) up to ``--slow-max-layers`` (4); "acdc greedy" up to
  ``--greedy-max-layers`` (1; at most 2), where its counted forwards are checked against the
  formula below.

**What is projected, not run**: "acdc greedy" above ``--greedy-max-layers``. Its forwards are the
count its implementation implies (``tl_noise/evaluation/node_baselines/acdc.py``: the
evaluator's means pass, full-model and empty-circuit passes, 3, plus one pass per candidate
circuit, ``N + (N - 1) + ... + 2 = N (N + 1) / 2 - 1``), so ``N (N + 1) / 2 + 2``; its seconds
are those forwards x the measured plain forward. The run at L=1 checks both: the count matched
the formula exactly (93), the seconds came to 0.63 x the projection (an ablated pass costs about
a plain one; the L=1 unit, 0.09 s, read high on the loaded machine: L=2's was 0.05 s).

**How forwards are counted** (one forward = one pass of the model over all ``n`` rows; a pass
over ``b`` rows counts ``b / n``; a backward counts 2):

* tl-noise, ``tl_noise/fitting/trainer.py`` (``Trainer.fit``): ``3 * steps * min(batch_size, n)
  / n`` for the fit steps (a noised forward + backward per step; the KL objective's clean
  distributions are cached once, ``fitting/task_losses.py:CleanTargets``), then
  ``tl_noise/fitting/refine.py`` (``RefineRanking.on_fit_end``) adds ``refined.forwards *
  examples / n``, where ``InContextMetric.__call__`` counts one per ablated pass of the
  backward elimination (``min(window, kept)`` per removal, window 8: ~8 N) and of the insertion
  polish. Not counted: attach's calibration pass, the clean-distribution cache pass and the
  refinement's ablation-means pass (3 set-up forwards).
* baselines, ``tl_noise/evaluation/node_baselines/common.py`` (module doc): mean ablation
  ``3 + N``, activation patching ``2 + N``, attribution patching 4, subnetwork probing and
  ibcircuit ``2 + 3 S b / n``, acdc greedy ``N (N + 1) / 2 + 2`` (each module's doc and its
  ``NodeScores.forwards``).

**Growth**: per method, ``forwards ~ c N^p`` by least squares on ``log forwards`` against
``log N`` over the depths where it ran (greedy: over every depth, from the formula); also for
the seconds and for tl-noise's two parts (fit steps; refinement). tl-noise's fit steps are a
constant (the step cap). Its refinement is linear in N with a bounded constant: the
elimination tries ``min(8, kept)`` candidates per removal (``8 N - 29`` passes for N >= 8), the
polish (window 4, at most 3 passes over the ranking, prefix sets cached) at most ~7 N passes
per pass, so at most ~29 N in all; but the polish makes more moves, and so uses more of its 3
passes, as N grows (5.5 N at N=13, 17.5 N at N=156), so the refinement's fitted exponent over
13..156 is above 1 (1.3) while the total's, with the fixed 1,500, stays below (0.5).
Greedy grows quadratically.

Results: ``benchmarks/results/node_cost.json`` (config, machine, every row, the greedy check,
exponents), rewritten after each depth.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import subprocess
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

import tl_noise as tn
from benchmarks.perf.report import write_json
from benchmarks.perf.settings import MODELS, RESULTS, ROOT
from benchmarks.perf.workload import make_tokens
from tl_noise.evaluation.node_baselines import BASELINES
from tl_noise.fitting import FitConfig
from tl_noise.names import NODE_HOOKS

TL_NOISE = "tl-noise"
FAST = ["mean ablation", "activation patching", "attribution patching (TL)"]
SLOW = ["subnetwork probing", "ibcircuit"]
GREEDY = "acdc greedy"
PLAIN = "plain forward"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.node_cost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--layers", type=int, nargs="+", default=[1, 2, 4, 8, 12])
    p.add_argument("--n", type=int, default=4, help="token rows (<= 32 keeps counts exact)")
    p.add_argument("--pos", type=int, default=4, help="tokens per row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--slow-max-layers", type=int, default=4,
                   help="deepest model for subnetwork probing and ibcircuit")  # fmt: skip
    p.add_argument("--greedy-max-layers", type=int, default=1, choices=[0, 1, 2],
                   help="deepest model on which acdc greedy runs (projected above)")  # fmt: skip
    p.add_argument("--json", type=Path, default=RESULTS / "node_cost.json")
    args = p.parse_args(argv)
    if args.n < 2 or args.pos < 2:
        p.error("--n and --pos must be >= 2")
    args.layers = sorted(set(args.layers))
    return args


def build(layers: int) -> Any:
    model = tn.build_native_model({**MODELS["gpt2-small"], "n_layers": layers}, device="cpu")
    model.eval()
    model.requires_grad_(False)
    return model


def make_data(model: Any, args: argparse.Namespace) -> tuple[torch.Tensor, ...]:
    tokens = make_tokens(model, args.n, args.pos, args.seed)
    corrupted = make_tokens(model, args.n, args.pos, args.seed + 1)
    tokens[:, 0] = corrupted[:, 0] = 0  # BOS
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[:, 0] = False
    return tokens, mask, corrupted


def plain_forward(model: Any, tokens: torch.Tensor, repeats: int = 3) -> float:
    """Median seconds of ``model(tokens)`` without gradients (after two warm-up calls)."""
    times = []
    with torch.no_grad():
        model(tokens)
        model(tokens)
        for _ in range(repeats):
            began = time.perf_counter()
            model(tokens)
            times.append(time.perf_counter() - began)
    return statistics.median(times)


def greedy_forwards(n_nodes: int) -> float:
    """acdc greedy's forwards (module doc): 3 set-up passes + N (N + 1) / 2 - 1 circuits."""
    return n_nodes * (n_nodes + 1) / 2 + 2


def run_tl_noise(model: Any, tokens: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
    began = time.perf_counter()
    noise = tn.attach_noise(model, NODE_HOOKS, calibration_tokens=tokens)
    attached = time.perf_counter()
    result = tn.fit(model, noise, tokens, loss_mask=mask, quiet=True)
    scores = tn.node_importance(noise)
    noise.remove()
    seconds = time.perf_counter() - began
    info = {k: v for k, v in (noise.ranking_info or {}).items()
            if k not in ("std_scores", "removal_order", "metrics")}  # fmt: skip
    if isinstance(info.get("polish"), dict):
        info["polish"] = {k: v for k, v in info["polish"].items() if k != "moves"} | {
            "n_moves": len(noise.ranking_info["polish"].get("moves", []))
        }
    n_examples = info.get("examples", len(tokens))
    refine = float(info.get("forwards", 0)) * n_examples / len(tokens)
    cap = FitConfig().steps
    steps = len(result.history)
    return {
        "forwards": float(result.forwards),
        "seconds": seconds,
        "attach_seconds": attached - began,
        "trainer_seconds": float(result.seconds),
        "steps": steps,
        "stopped_at": result.stopped_at,
        "step_cap": cap,
        "hit_step_cap": result.stopped_at is None and steps >= cap,
        "fit_step_forwards": float(result.forwards) - refine,
        "refinement_forwards": refine,
        "ranking_info": info,
        "n_scores": len(scores),
    }


def run_baseline(name: str, model: Any, tokens: torch.Tensor, mask: torch.Tensor,
                 corrupted: torch.Tensor) -> dict[str, Any]:  # fmt: skip
    out = BASELINES.get(name)(model, tokens, mask, corrupted_tokens=corrupted)
    row: dict[str, Any] = {"forwards": float(out.forwards), "seconds": float(out.seconds)}
    if "backend" in out.details:
        row["backend"] = out.details["backend"]
    return row


def measure(layers: int, args: argparse.Namespace, log: Any) -> tuple[list[dict], dict | None]:
    """Every method at one depth: the rows, and the greedy check where greedy ran."""
    model = build(layers)
    n_nodes = layers * (int(model.cfg.n_heads) + 1)
    tokens, mask, corrupted = make_data(model, args)
    unit = plain_forward(model, tokens)
    rows: list[dict[str, Any]] = []

    def add(method: str, row: dict[str, Any], run: bool = True) -> None:
        row = {"layers": layers, "nodes": n_nodes, "method": method, "run": run, **row}
        row["seconds_per_plain_forward"] = row["seconds"] / unit
        rows.append(row)
        log(row)

    add(PLAIN, {"forwards": 1.0, "seconds": unit})
    add(TL_NOISE, run_tl_noise(model, tokens, mask))
    slow = SLOW if layers <= args.slow_max_layers else []
    for name in FAST + slow:
        add(name, run_baseline(name, model, tokens, mask, corrupted))
    formula = greedy_forwards(n_nodes)
    check = None
    if layers <= args.greedy_max_layers:
        row = run_baseline(GREEDY, model, tokens, mask, corrupted)
        check = {"layers": layers, "nodes": n_nodes, "counted_forwards": row["forwards"],
                 "formula_forwards": formula, "equal": row["forwards"] == formula,
                 "measured_seconds": row["seconds"], "projected_seconds": formula * unit,
                 "measured/projected": row["seconds"] / (formula * unit)}  # fmt: skip
        add(GREEDY, {**row, "formula_forwards": formula})
    else:
        add(GREEDY, {"forwards": formula, "seconds": formula * unit, "projected": True}, False)
    return rows, check


def power_law(points: list[tuple[float, float]]) -> float | None:
    """Exponent ``p`` of ``y ~ c x^p``, least squares in log-log; None under 2 distinct x."""
    pts = [(math.log(x), math.log(y)) for x, y in points if x > 0 and y > 0]
    if len({x for x, _ in pts}) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def exponents(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    parts = {f"{TL_NOISE} (fit steps)": "fit_step_forwards",
             f"{TL_NOISE} (refinement)": "refinement_forwards"}  # fmt: skip
    for method in methods + list(parts):
        key = parts.get(method, "forwards")
        base = TL_NOISE if method in parts else method
        mine = [r for r in rows if r["method"] == base]
        seconds = [(r["nodes"], r["seconds"]) for r in mine]
        out[method] = {
            "nodes": [r["nodes"] for r in mine],
            "forwards_p": power_law([(r["nodes"], r[key]) for r in mine]),
            "seconds_p": None if method in parts else power_law(seconds),
            "projected_at": [r["nodes"] for r in mine if not r["run"]],
        }
    return out


def fmt_row(r: dict[str, Any]) -> str:
    mark = " (projected)" if not r["run"] else ""
    return (f"{r['layers']:>3} {r['nodes']:>4}  {r['method'] + mark:<38} {r['forwards']:>10.1f} "
            f"{r['seconds']:>10.2f} {r['seconds_per_plain_forward']:>9.1f}")  # fmt: skip


HEADER = f"{'L':>3} {'N':>4}  {'method':<38} {'forwards':>10} {'seconds':>10} {'/fwd':>9}"


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformer_lens": version("transformer-lens"),
        "load_average_at_start": list(os.getloadavg()),
        "git_commit": git_commit(),
    }


def report(rows: list[dict[str, Any]], checks: list[dict[str, Any]]) -> None:
    print("\n" + HEADER)
    for r in rows:
        print(fmt_row(r))
    for c in checks:
        print(f"\nacdc greedy at L={c['layers']} (N={c['nodes']}): counted "
              f"{c['counted_forwards']:.0f} forwards, formula N(N+1)/2+2 = "
              f"{c['formula_forwards']:.0f} ({'equal' if c['equal'] else 'DIFFERENT'}); "
              f"measured {c['measured_seconds']:.2f} s = {c['measured/projected']:.2f} x "
              "the projection")  # fmt: skip
    print("\ngrowth, forwards ~ N^p (log-log least squares over the sizes shown):")
    for method, e in exponents(rows).items():
        if method == PLAIN:
            continue
        p, ps = e["forwards_p"], e["seconds_p"]
        extra = f", seconds p = {ps:.2f}" if ps is not None else ""
        proj = f" (projected at N={e['projected_at']})" if e["projected_at"] else ""
        print(f"  {method:<38} p = {p if p is None else round(p, 2)}{extra}  "
              f"N={e['nodes']}{proj}")  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    out: dict[str, Any] = {
        "config": {**vars(args), "json": str(args.json),
                   "model_config": MODELS["gpt2-small"], "hooks": NODE_HOOKS,
                   "fit_defaults": {"steps": FitConfig().steps, "batch_size":
                                    FitConfig().batch_size, "stable_window":
                                    FitConfig().stable_window, "refine_window":
                                    FitConfig().refine_window}},
        "machine": machine(),
        "rows": [],
        "greedy_check": [],
    }  # fmt: skip
    print(HEADER, flush=True)
    for layers in args.layers:
        rows, check = measure(layers, args, lambda r: print(fmt_row(r), flush=True))
        out["rows"] += rows
        out["greedy_check"] += [check] if check else []
        out["exponents"] = exponents(out["rows"])
        out["total_seconds"] = time.perf_counter() - began
        out["machine"]["load_average_at_end"] = list(os.getloadavg())
        if args.json:
            write_json(out, args.json)
    report(out["rows"], out["greedy_check"])
    print(f"\ntotal {out['total_seconds']:.0f} s" + (f"; wrote {args.json}" if args.json else ""))
    return out


if __name__ == "__main__":
    main()
