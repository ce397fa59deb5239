"""Standalone worker of ``--compare-ref``: times a plain forward, a noised forward and a fit
step with whichever ``tl_noise`` comes first on ``PYTHONPATH`` (a ``git worktree`` of the
revision, or this checkout), through the public API alone, so any revision since ``tn.fit``
took ``steps``/``batch_size`` can be measured.

Run as ``python -P ref_worker.py SPEC.json OUT.json`` (``-P``: this folder is not put on
``sys.path``). The fit step is ``(T(n2) - T(n1)) / (n2 - n1)`` over two ``tn.fit`` calls of
``n1`` and ``n2`` steps: setup (clean-target cache) and the history records of the first and
last steps cancel, and no callback API is needed. Keywords a revision's ``tn.fit`` lacks are
left out (``refine_window=0``: no ranking refinement after the steps, where there is one).
"""

from __future__ import annotations

import inspect
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.benchmark import Timer

import tl_noise as tn


def _op(fn: Any, spec: dict[str, Any]) -> float:
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=spec["threads"])
    return float(timer.blocked_autorange(min_run_time=spec["min_run_time"]).median)


def _fit_seconds(model: Any, noise: Any, tokens: torch.Tensor, steps: int, spec: dict) -> float:
    wanted = {
        "steps": steps,
        "batch_size": spec["batch"],
        "lr": 0.05,
        "quiet": True,
        "log_every": 10**9,
        "refine_window": 0,
    }
    accepted = inspect.signature(tn.fit).parameters
    kwargs = {k: v for k, v in wanted.items() if k in accepted}
    if spec["device"].startswith("cuda"):
        torch.cuda.synchronize()
    began = time.perf_counter()
    tn.fit(model, noise, tokens, **kwargs)
    if spec["device"].startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - began


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(spec["threads"])
    model = tn.build_native_model(spec["model_config"], device=spec["device"])
    if spec["dtype"] == "bf16":
        model = model.to(torch.bfloat16)
    model.eval()
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(
        0, int(model.cfg.d_vocab), (2 * spec["batch"], spec["pos"]), generator=gen
    )
    batch = tokens[: spec["batch"]].to(spec["device"])
    out: dict[str, Any] = {"tl_noise_file": tn.__file__}
    with torch.no_grad():
        out["plain_forward"] = _op(lambda: model(batch), spec)
        noise = tn.attach_noise(
            model, spec["hooks"], granularity="auto", calibration_tokens=tokens[:2]
        )
        out["noised_forward"] = _op(lambda: model(batch), spec)
    n1, n2 = 2, 2 + spec["extra_steps"]
    _fit_seconds(model, noise, tokens, n1, spec)  # warm-up
    t1 = _fit_seconds(model, noise, tokens, n1, spec)
    t2 = _fit_seconds(model, noise, tokens, n2, spec)
    out["fit_step"] = (t2 - t1) / (n2 - n1)
    noise.remove()
    return out


if __name__ == "__main__":
    spec_path, out_path = (Path(a) for a in sys.argv[1:3])
    result = measure(json.loads(spec_path.read_text()))
    out_path.write_text(json.dumps(result))
