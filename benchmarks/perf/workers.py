"""Sections measured in other processes: TransformerLens 3.x (``.venv-tl3``) and a git
revision of tl-noise (``--compare-ref``, in a ``git worktree``)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

from benchmarks.perf.memory import worker_command
from benchmarks.perf.settings import HOOKS, MODELS, ROOT, TL3_PYTHON
from benchmarks.perf.timing import fit_steps, median, medians, rounds
from benchmarks.perf.workload import attach, build_model, make_tokens, noised_forward, plain_forward

REF_WORKER = Path(__file__).resolve().parent / "ref_worker.py"


def tl3_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Plain forward, noised forward and fit step in this process (run by ``.venv-tl3``)."""
    model = build_model(args)
    tokens = make_tokens(model, 2 * args.batch, args.pos)
    batch = tokens[: args.batch].to(args.device)
    noise = attach(model, tokens)
    variants: dict[str, Callable[[], list[float] | float]] = {
        "plain_forward": lambda: plain_forward(model, noise, batch, args),
        "noised_forward": lambda: noised_forward(model, batch, args),
        "fit_step": lambda: fit_steps(model, noise, tokens, args.device, args.batch),
    }
    med = medians(rounds(variants, args.rounds))
    noise.remove()
    return {**med, "transformer_lens": version("transformer-lens"), "model": type(model).__name__}


def section_tl3(args: argparse.Namespace, tl4: dict[str, float]) -> dict[str, Any]:
    if not TL3_PYTHON.exists():
        return {"skipped": f"{TL3_PYTHON} not found"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "tl3.json"
        cmd = worker_command(args, "tl3", out, str(TL3_PYTHON))
        cmd[1:1] = ["-W", "ignore::DeprecationWarning"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, cwd=ROOT)
        if proc.returncode != 0:
            return {"skipped": f"the 3.x worker failed: {proc.stderr[-1500:]}"}
        tl3 = json.loads(out.read_text())
    keys = ("plain_forward", "noised_forward", "fit_step")
    return {
        "tl3": tl3,
        "tl4": {k: tl4[k] for k in keys},
        "ratios": {f"tl4/tl3 {k}": tl4[k] / tl3[k] for k in keys},
        "tl3 fit_step/plain_forward": tl3["fit_step"] / tl3["plain_forward"],
        "tl3 noised_forward/plain_forward": tl3["noised_forward"] / tl3["plain_forward"],
        "note": "3.x measured in a subprocess right after the 4.x rounds (not interleaved)",
    }


def _run_ref_worker(tree: Path, spec: Path, tmp: Path, label: str) -> dict[str, Any]:
    out = tmp / f"{label}.json"
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.run(
        [sys.executable, "-P", str(REF_WORKER), str(spec), str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp,
        timeout=3600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"revision worker ({label}) failed:\n{proc.stderr[-2000:]}")
    return json.loads(out.read_text())


def _ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
    return {
        "noised_forward/plain_forward": median(
            [r["noised_forward"] / r["plain_forward"] for r in rows]
        ),
        "fit_step/plain_forward": median([r["fit_step"] / r["plain_forward"] for r in rows]),
    }


def section_compare(args: argparse.Namespace) -> dict[str, Any]:
    """This checkout against revision ``args.compare_ref``: the same standalone worker runs in
    fresh processes on either tree, alternating, ``args.rounds`` times each."""
    ref = args.compare_ref
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--verify", f"{ref}^{{commit}}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    spec = {
        "model_config": MODELS[args.model],
        "hooks": HOOKS,
        "device": args.device,
        "dtype": args.dtype,
        "threads": args.threads,
        "batch": args.batch,
        "pos": args.pos,
        "min_run_time": args.min_run_time,
        "extra_steps": 6 if args.quick else 3,
    }
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        tree = tmp / "tree"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), commit],
            check=True,
            capture_output=True,
            text=True,
        )
        try:
            (tmp / "spec.json").write_text(json.dumps(spec))
            trees = {"now": ROOT, "ref": tree}
            rows: dict[str, list[dict[str, Any]]] = {"now": [], "ref": []}
            for r in range(args.rounds):
                for label in ("now", "ref") if r % 2 == 0 else ("ref", "now"):
                    rows[label].append(_run_ref_worker(trees[label], tmp / "spec.json", tmp, label))
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                capture_output=True,
                text=True,
            )
    now, old = _ratios(rows["now"]), _ratios(rows["ref"])
    return {
        "ref": ref,
        "commit": commit,
        "method": "fresh process per tree and round; fit step = (T(n2) - T(n1)) / (n2 - n1)",
        "now": now,
        "at_ref": old,
        "speedup fit_step (ref/now)": old["fit_step/plain_forward"] / now["fit_step/plain_forward"],
        "speedup noised_forward (ref/now)": (
            old["noised_forward/plain_forward"] / now["noised_forward/plain_forward"]
        ),
        "rows": rows,
    }
