"""The schema of a run directory's files, checked where :class:`tl_noise.runs.Run` reads them.

Every file is read without following a symbolic link, within a size limit, and parsed with a
guard on its nesting depth and on numbers Python cannot hold; then its fields are checked for
the types and shapes the readers rely on. Every failure is one :class:`RunFileError` (a
``ValueError``) naming the file and the field, which the dashboard shows as a message:

* ``config.json``: :func:`check_config`; ``status.json``: :func:`check_status`;
* ``summary.json``: :func:`ground_truth_of`, :func:`faithfulness_of`, :func:`importance_of`
  (one field each, so one bad field leaves the others readable);
* each history record: :func:`check_record` keeps the fields that pass and says what is wrong
  with the others (a line that is no record at all is skipped by the history reader).
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
from pathlib import Path
from typing import Any

import numpy as np

from tl_noise.errors import RunFileError, TLNoiseValueError
from tl_noise.io import MAX_JSON_BYTES
from tl_noise.noise.granularity import param_shape_for
from tl_noise.noise.sizing import noise_config_elements
from tl_noise.runs.format import config_problem

MAX_DEPTH = 32
"""The deepest nesting of objects and lists a run file may have (tl-noise writes at most ~6)."""
MAX_HEADS = 2**20
"""The most heads (``n_layers * n_heads``) a run may declare; per-head views allocate that many."""
NONFINITE = ("nan", "inf", "-inf")  # how history writes non-finite floats


def link_refused(path: Path) -> RunFileError:
    return RunFileError(
        f"{str(path)!r} is a symbolic link; tl-noise never follows links inside a run directory "
        "(copy the file into the run instead)",
        str(path),
    )


def refuse_links(run_dir: Path, *parts: str) -> Path:
    """``run_dir / parts...``, with RunFileError when any part below ``run_dir`` is a link."""
    path = run_dir
    for part in parts:
        path = path / part
        if path.is_symlink():
            raise link_refused(path)
    return path


def open_nofollow(path: Path) -> int:
    """A read-only descriptor of ``path``; RunFileError when it is a symbolic link or not a
    regular file, FileNotFoundError when it is missing."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as err:
        if err.errno == errno.ELOOP or path.is_symlink():
            raise link_refused(path) from err
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise RunFileError(f"{str(path)!r} is not a regular file", str(path))
    return fd


def depth_problem(value: Any, limit: int = MAX_DEPTH) -> str:
    """What is wrong when ``value`` nests more than ``limit`` levels deep, else "" (iterative:
    a deep value cannot exhaust the stack)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = (
            item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        )
        if children and depth > limit:
            return f"nests more than {limit} levels deep"
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return ""


def parse_json(data: bytes | str, file: str) -> Any:
    """JSON of a run file, RunFileError naming ``file`` when it is not JSON, nests too deep or
    holds a number Python refuses (an integer of thousands of digits)."""
    try:
        value = json.loads(data)
    except RecursionError as err:
        raise RunFileError(f"{file!r} nests too deep to be read", file) from err
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, an oversized integer
        raise RunFileError(f"{file!r} is not valid JSON: {err}", file) from err
    problem = depth_problem(value)
    if problem:
        raise RunFileError(f"{file!r} {problem}", file)
    return value


def read_run_json(path: Path, what: str, limit: int = MAX_JSON_BYTES) -> Any:
    """A JSON file of a run directory: not through a link, at most ``limit`` bytes, parsed by
    :func:`parse_json`; RunFileError naming the file otherwise (also when it is missing)."""
    try:
        fd = open_nofollow(path)
    except FileNotFoundError as err:
        raise RunFileError(f"{what} {str(path)!r} does not exist", str(path)) from err
    with os.fdopen(fd, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size > limit:
            raise RunFileError(
                f"{what} {str(path)!r} is {size / 2**20:.0f} MiB, more than the "
                f"{limit / 2**20:.0f} MiB tl-noise reads; it is not a file tl-noise wrote, or "
                "it is damaged",
                str(path),
            )
        data = handle.read(limit + 1)
    return parse_json(data, str(path))


# ----------------------------------------------------------------------------- fields
def _bad(file: str, field: str, problem: str) -> RunFileError:
    return RunFileError(f"{file!r}: {field} {problem}", file, field)


def is_number(value: Any) -> bool:
    """A history number: an int or float (not a bool), null, or "nan"/"inf"/"-inf"."""
    if isinstance(value, str):
        return value in NONFINITE
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), "null" if value is None else "a number"
    )


def _check_type(file: str, field: str, value: Any, kinds: tuple[type, ...], what: str) -> None:
    if value is None or (isinstance(value, kinds) and not isinstance(value, bool)):
        return
    raise _bad(file, field, f"is {_kind(value)}; expected {what} or null")


Fields = dict[str, tuple[tuple[type, ...], str]]  # field -> (types, what they are called)
CONFIG_SECTIONS: dict[str, Fields] = {  # every field may be null or absent
    "fit": {
        "steps": ((int,), "an int"),
        "mode": ((str,), "a string"),
        "objective": ((str,), "a string"),
        "lr": ((int, float), "a number"),
    },
    "task": {"name": ((str,), "a string")},
    "model": {"name": ((str,), "a string")},
}


def check_config(config: Any, file: str) -> dict[str, Any]:
    """``config.json`` as the readers use it; RunFileError naming the field otherwise."""
    problem = config_problem(config)
    if problem:
        raise RunFileError(f"config.json {problem}", file, "")
    fingerprint = config["model"]["fingerprint"]
    heads = fingerprint["n_layers"] * fingerprint["n_heads"]
    if heads > MAX_HEADS:
        raise _bad(file, "model.fingerprint", f"declares {heads} heads; at most {MAX_HEADS}")
    for section, fields in CONFIG_SECTIONS.items():
        value = config.get(section)
        _check_type(file, section, value, (dict,), "an object")
        for name, (kinds, what) in fields.items():
            _check_type(file, f"{section}.{name}", (value or {}).get(name), kinds, what)
    ground_truth_of(config["model"].get("ground_truth"), fingerprint, file, "model.ground_truth")
    noise = config.get("noise")
    _check_type(file, "noise", noise, (dict,), "an object")
    hooks = (noise or {}).get("hooks")
    _check_type(file, "noise.hooks", hooks, (dict,), "an object")
    for name, layer in (hooks or {}).items():
        try:
            noise_config_elements(layer)
            _check_type(file, "granularity", layer.get("granularity"), (str,), "a string")
        except TLNoiseValueError as err:
            raise _bad(file, f"noise.hooks[{name!r}]", f"is malformed: {err}") from err
    return config


def check_status(status: Any, file: str) -> dict[str, Any]:
    """``{"state", "step", "message"}`` of ``status.json``; RunFileError naming the field."""
    if not isinstance(status, dict):
        raise _bad(file, "the file", f"is {_kind(status)}; expected an object")
    _check_type(file, "state", status.get("state"), (str,), "a string")
    _check_type(file, "step", status.get("step"), (int,), "an int")
    _check_type(file, "message", status.get("message"), (str,), "a string")
    return {
        "state": status.get("state") or "unknown",
        "step": status.get("step"),
        "message": status.get("message") or "",
    }


def ground_truth_of(
    truth: Any, fingerprint: dict[str, int], file: str, field: str = "ground_truth"
) -> dict[str, list[list[int]]] | None:
    """Known circuit heads ``{class: [[layer, head], ...]}`` (a bare list: class "circuit"),
    every head inside the model; None when absent or empty; RunFileError naming the field."""
    if not truth:
        return None
    groups = truth if isinstance(truth, dict) else {"circuit": truth}
    bounds = (fingerprint["n_layers"], fingerprint["n_heads"])
    for cls, heads in groups.items():
        where = f"{field}[{cls!r}]" if isinstance(truth, dict) else field
        if not isinstance(heads, list):
            raise _bad(file, where, f"is {_kind(heads)}; expected a list of [layer, head]")
        for i, pair in enumerate(heads):
            ok = isinstance(pair, list) and len(pair) == 2
            ok = ok and all(
                type(v) is int and 0 <= v < b for v, b in zip(pair, bounds, strict=True)
            )
            if not ok:
                raise _bad(
                    file, f"{where}[{i}]", f"is {pair!r}; expected [layer, head] inside the "
                    f"model's {bounds[0]} layers x {bounds[1]} heads"
                )  # fmt: skip
    return {str(cls): [list(p) for p in heads] for cls, heads in groups.items() if heads} or None


def faithfulness_of(curve: Any, file: str) -> dict[str, list[float]] | None:
    """``{"k": [...], "faithfulness": [...]}`` of ``summary.json`` (None when absent)."""
    if curve is None:
        return None
    if not isinstance(curve, dict):
        raise _bad(file, "faithfulness", f"is {_kind(curve)}; expected an object")
    ks, values = curve.get("k", curve.get("ks")), curve.get("faithfulness")
    if not (isinstance(ks, list) and all(type(k) is int and k >= 0 for k in ks)):
        raise _bad(file, "faithfulness.k", f"is {ks!r:.80}; expected a list of ints >= 0")
    if not (isinstance(values, list) and all(map(is_number, values))):
        raise _bad(file, "faithfulness.faithfulness", f"is {values!r:.80}; expected numbers")
    if len(ks) != len(values):
        raise _bad(file, "faithfulness", f"has {len(ks)} k but {len(values)} values")
    return {"k": list(ks), "faithfulness": [_as_float(v) for v in values]}


def importance_of(scores: Any, file: str) -> dict[str, float] | None:
    """``node_importance`` of ``summary.json``, ``{node: score}`` (None when absent)."""
    if scores is None:
        return None
    ok = isinstance(scores, dict) and all(
        is_number(v) and not isinstance(v, str) and v is not None for v in scores.values()
    )
    if not ok:
        raise _bad(file, "node_importance", "is not an object of {node: number}")
    return {str(k): float(v) for k, v in scores.items()}


def _as_float(value: Any) -> float:
    return math.nan if value is None else float(value)


# ---------------------------------------------------------------------- history records
def record_shapes(config: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], int | None]]:
    """Hook -> (the shape of its std in a history record, its heads or None) from the noise
    settings in ``config.json`` (hooks whose settings are missing are not shape-checked)."""
    out = {}
    for name, layer in ((config.get("noise") or {}).get("hooks") or {}).items():
        try:
            unit = tuple(layer["unit_shape"])
            base = param_shape_for(unit, layer.get("granularity", "head"), name)
        except (KeyError, TypeError, ValueError):
            continue
        positions = layer.get("n_positions")
        heads = unit[0] if len(unit) == 2 else None
        out[name] = (((positions,) if positions else ()) + tuple(base), heads)
    return out


def _array_problem(value: Any, shape: tuple[int, ...] | None) -> str:
    if not isinstance(value, (list, int, float, str)) or isinstance(value, bool):
        return f"is {_kind(value)}; expected numbers"
    try:
        array = np.asarray(value, dtype=np.float64)
    except (ValueError, TypeError, OverflowError) as err:
        return f"is not an array of numbers ({str(err)[:120]})"
    if shape is not None and array.shape != shape:
        return f"has shape {list(array.shape)}; expected {list(shape)}"
    return ""


def _std_problem(std: Any, shapes: dict[str, Any]) -> str:
    if not isinstance(std, dict):
        return f"is {_kind(std)}; expected an object of hook: stds"
    for hook, value in std.items():
        problem = _array_problem(value, shapes.get(hook, (None,))[0])
        if problem:
            return f"std[{hook!r}] {problem}"
    return ""


def _grad_problem(grad: Any, shapes: dict[str, Any]) -> str:
    if not isinstance(grad, dict):
        return f"is {_kind(grad)}; expected an object of hook: statistics"
    for hook, stats in grad.items():
        if not isinstance(stats, dict):
            return f"grad[{hook!r}] is {_kind(stats)}; expected an object"
        heads = shapes.get(hook, (None, None))[1]
        for key, values in stats.items():
            if not (isinstance(values, list) and all(map(is_number, values))):
                return f"grad[{hook!r}][{key!r}] is not a list of numbers"
            if heads is not None and len(values) != heads:
                return f"grad[{hook!r}][{key!r}] has {len(values)} values; expected {heads}"
    return ""


def _scalars_problem(value: Any) -> str:
    if not isinstance(value, dict):
        return f"is {_kind(value)}; expected an object of numbers"
    bad = [k for k, v in value.items() if not is_number(v)]
    return f"has non-numbers at {bad[:5]}" if bad else ""


RECORD_FIELDS = {
    "loss": lambda v, s: _scalars_problem(v),
    "equivalent": lambda v, s: _scalars_problem(v),
    "mean_std": lambda v, s: "" if is_number(v) else f"is {_kind(v)}; expected a number",
    "std": _std_problem,
    "grad": _grad_problem,
}


def check_record(record: Any, shapes: dict[str, Any]) -> tuple[dict[str, Any] | None, dict]:
    """``(record, problems)`` of one parsed history line: the record without the fields that
    fail the schema, and ``{field: what is wrong}`` for those; ``(None, {})`` when the line is
    not a record at all (not an object with an int ``step`` >= 0)."""
    if not isinstance(record, dict):
        return None, {}
    step = record.get("step")
    if type(step) is not int or step < 0:
        return None, {}
    clean: dict[str, Any] = {"step": step}
    problems: dict[str, str] = {}
    for key, value in record.items():
        if key == "step":
            continue
        check = RECORD_FIELDS.get(key)
        problem = check(value, shapes) if check else depth_problem(value, MAX_DEPTH - 1)
        if problem:
            problems[key] = problem if problem.startswith(key) else f"{key} {problem}"
        else:
            clean[key] = value
    return clean, problems
