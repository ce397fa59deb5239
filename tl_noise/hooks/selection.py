"""Choosing hook points: checks on the model and tokens, and expanding hook specs to names.

The bridge (TransformerLens 4.x) lists one ``HookPoint`` under several names (its module path
``blocks.0.attn.o.hook_in`` and the 3.x name ``blocks.0.attn.hook_z``); a spec selects the
HookPoint once, under the name both versions share.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

HookSpec = str | Iterable[str] | Callable[[str], bool]
UNSUPPORTED_HOOKS = ("hook_pattern", "hook_attn_scores")


def check_model(model: Any) -> None:
    """TypeError unless ``model`` is a TransformerLens model (has ``hook_dict`` and ``cfg``)."""
    if not (hasattr(model, "hook_dict") and hasattr(model, "cfg") and isinstance(model, nn.Module)):
        raise TypeError(
            f"expected a TransformerLens model (TransformerBridge or HookedTransformer), got "
            f"{type(model).__name__}; load one with tl_noise.load_model(name_or_path)"
        )


def check_seed(seed: Any) -> None:
    """TypeError unless ``seed`` is an int or None (the noise's seed)."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed={seed!r}; expected an int or None (torch's global RNG)")


def check_tokens(model: Any, tokens: Any, what: str = "tokens") -> None:
    """TypeError/ValueError naming the problem unless ``tokens`` is a non-empty ``[n, pos]``
    int64/int32 tensor of ids in ``[0, d_vocab)`` on a real device."""
    kind = f"{what} must be an int tensor [n, pos]"
    if not isinstance(tokens, Tensor):
        raise TypeError(f"{kind}, got {type(tokens).__name__}")
    if tokens.dtype not in (torch.int64, torch.int32):  # what an embedding lookup takes
        hint = "" if tokens.is_floating_point() or tokens.dtype == torch.bool else "; use .long()"
        raise TypeError(f"{kind} (int64 or int32), got dtype {tokens.dtype}{hint}")
    if tokens.ndim != 2:
        raise TypeError(f"{kind}, got shape {list(tokens.shape)}")
    if tokens.device.type == "meta":
        raise ValueError(f"{what} are on the meta device (no data); pass real token ids")
    if tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise ValueError(f"{what} has shape {list(tokens.shape)}: the dataset is empty")
    vocab = int(model.cfg.d_vocab)
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= vocab:
        raise ValueError(
            f"{what} must lie in [0, {vocab - 1}] (d_vocab={vocab}); found [{low}, {high}]"
        )


def _hook_name_preference(name: str) -> tuple[bool, int]:
    # The bridge lists a HookPoint under its module path ("blocks.0.attn.o.hook_in") and under
    # the TransformerLens 3.x name ("blocks.0.attn.hook_z"); prefer the latter, which both share.
    return (name.endswith((".hook_in", ".hook_out")), len(name))


def resolve_hook_names(model: Any, hooks: HookSpec) -> list[str]:
    """Expand exact names, glob patterns (``"blocks.*.attn.hook_z"``) or a predicate.

    Names that refer to the same HookPoint (the bridge's aliases) are kept once. Unknown names
    raise a ValueError listing the closest valid names; in a list, a glob pattern may match
    nothing (``"blocks.*.hook_mlp_out"`` on an attention-only model) as long as another matches.
    """
    check_model(model)
    hook_dict = model.hook_dict
    all_names = list(hook_dict)
    if callable(hooks) and not isinstance(hooks, str):
        matched = [n for n in all_names if hooks(n)]
        if not matched:
            raise ValueError(f"the hook predicate {hooks!r} selected no hook point of the model")
    else:
        matched = _match_specs(hooks, all_names, hook_dict)
    return _one_name_per_point(matched, hook_dict)


def _match_specs(
    hooks: str | Iterable[str], all_names: list[str], hook_dict: Mapping[str, Any]
) -> list[str]:
    """The names matched by each name or glob pattern in ``hooks``, in order, without repeats."""
    try:
        specs = [hooks] if isinstance(hooks, str) else list(hooks)
    except TypeError:
        specs = []
    if not specs or not all(isinstance(s, str) for s in specs):
        raise TypeError(f"hooks={hooks!r}; expected a name, a glob pattern, a list, or a callable")
    matched: list[str] = []
    empty_patterns = []
    for spec in specs:
        pattern = any(c in spec for c in "*?[")
        found = fnmatch.filter(all_names, spec) if pattern else [spec] * (spec in hook_dict)
        if not found and pattern and len(specs) > 1:
            # one of several patterns may match nothing (the MLP glob on an attention-only model)
            empty_patterns.append(spec)
            continue
        if not found:
            close = difflib.get_close_matches(spec, all_names, n=5, cutoff=0.5)
            hint = f"; closest: {', '.join(close)}" if close else ""
            raise ValueError(f"unknown hook point {spec!r}{hint}")
        matched.extend(n for n in found if n not in matched)
    if not matched:
        raise ValueError(f"none of the patterns {empty_patterns} matches a hook point")
    return matched


def _one_name_per_point(matched: list[str], hook_dict: Mapping[str, Any]) -> list[str]:
    """Keep each HookPoint once, under its preferred alias, in first-seen order."""
    by_point: dict[int, str] = {}
    order: list[int] = []
    for name in matched:
        key = id(hook_dict[name])
        if key not in by_point:
            order.append(key)
            by_point[key] = name
        elif _hook_name_preference(name) < _hook_name_preference(by_point[key]):
            by_point[key] = name
    return [by_point[k] for k in order]
