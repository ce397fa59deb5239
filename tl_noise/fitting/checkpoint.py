"""What a checkpoint holds beyond the noise: the optimizer's state, and reading it back on resume.

The optimizer's moments go to safetensors, its step counts and param groups to JSON (never a
pickle); the mode's state (budget's multiplier) sits beside them in ``trainer_state.json``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import Tensor

from tl_noise.errors import TLNoiseValueError
from tl_noise.hooks import NoiseHooks
from tl_noise.runs.writer import latest_checkpoint, read_trainer_state

Checkpoint = tuple[int, dict[str, Any], dict[str, Tensor], NoiseHooks]
"""``(step, trainer state, optimizer tensors, saved noise)``."""


def optimizer_meta(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    state = optimizer.state_dict()
    meta: dict[str, Any] = {"param_groups": state["param_groups"], "steps": {}}
    for key, value in state["state"].items():
        meta["steps"][str(key)] = float(value["step"]) if "step" in value else 0.0
    return meta


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
    out = {}
    for key, value in optimizer.state_dict()["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            if name in value:
                out[f"{key}.{name}"] = value[name]
    return out


def load_optimizer(
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
        raise TLNoiseValueError("the checkpoint's optimizer does not match these noise parameters")
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _noise_differences(loaded: NoiseHooks, noise: NoiseHooks) -> list[str]:
    theirs = json.loads(json.dumps(loaded.config()["hooks"]))
    ours = json.loads(json.dumps(noise.config()["hooks"]))
    problems = []
    for name in dict.fromkeys(loaded.hook_names + noise.hook_names):
        a, b = theirs.get(name), ours.get(name)
        if a is None or b is None:
            problems.append(f"{name}: {'not in the run' if a is None else 'not in this noise'}")
            continue
        problems += [
            f"{name}.{k}: {a.get(k)!r} -> {b.get(k)!r}"
            for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)
        ]
    if not problems and loaded.hook_names != noise.hook_names:
        problems.append(f"hook order {loaded.hook_names} -> {noise.hook_names}")
    return problems


def read_resume_checkpoint(
    model: Any, noise: NoiseHooks, run_dir: str | os.PathLike | None
) -> Checkpoint:
    """The checkpoint a resumed fit starts from; ValueError naming the run when it is missing,
    unreadable or for other noise."""
    if run_dir is None:
        raise TLNoiseValueError("resume=True needs run_dir, the directory of the run to continue")
    found = latest_checkpoint(run_dir)
    if found is None:
        raise TLNoiseValueError(f"resume=True but {str(run_dir)!r} has no checkpoint yet")
    start, folder = found
    state, opt_tensors = read_trainer_state(folder)
    loaded = NoiseHooks.load(folder, model, attach=False)
    problems = _noise_differences(loaded, noise)
    if problems:
        raise TLNoiseValueError(
            f"cannot resume {str(run_dir)!r} with different noise: {'; '.join(problems)}"
        )
    return start, state, opt_tensors, loaded
