"""What :func:`tl_noise.fit` checks before it writes anything, and what it keeps around the fit.

* :func:`check_run_dir`, :func:`warn_ignored_metric`, :func:`check_metric_output`: refuse bad
  input while the run directory is still untouched (a metric returning a float fails here, not
  after ``config.json`` exists);
* :func:`data_identity`: the ``"data"`` section of a run's config (content hashes of tokens,
  loss mask and extras, the metric's name and source), which a resume must match;
* :func:`completed_result`: resuming a completed run with its own step count does nothing;
* :func:`fit_guard`: SIGTERM stops a fit like Ctrl-C, and the noise's seed, generator states and
  per-layer modes are restored afterwards.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import re
import signal
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tl_noise.devices import model_device
from tl_noise.errors import TLNoiseTypeError, TLNoiseValueError
from tl_noise.fitting.config import FitConfig
from tl_noise.fitting.inputs import FitData
from tl_noise.fitting.trainer import FitResult, frozen_forward, safe_importance
from tl_noise.hooks import NoiseHooks
from tl_noise.io import read_json
from tl_noise.runs.format import CONFIG, FINAL, SUMMARY
from tl_noise.runs.history import read_history
from tl_noise.runs.writer import check_resumable, read_status


# ------------------------------------------------------------------------ arguments
def check_run_dir(run_dir: Any) -> None:
    """``run_dir=""`` would write into the current directory: refuse it."""
    if isinstance(run_dir, str) and not run_dir.strip():
        raise TLNoiseValueError(
            f"run_dir={run_dir!r}; pass a directory path (or None for no run directory)"
        )


def warn_ignored_metric(objective: Any, metric: Callable | None) -> None:
    """A ``metric=`` the objective does not use is a mistake worth a warning."""
    if metric is None or objective == "metric":
        return
    name = getattr(objective, "__name__", "a callable") if callable(objective) else objective
    warnings.warn(
        f"metric= is ignored with objective={name!r}; pass objective='metric' to fit the metric",
        UserWarning,
        stacklevel=3,
    )


# -------------------------------------------------------------------- the metric's output
EXPECTED = "expected a 0-d floating tensor computed from the logits (the loss to minimise)"


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {list(value.shape)}"
    return f"{type(value).__name__} {value!r:.60}"


def check_metric_value(value: Any) -> None:
    """TypeError/ValueError naming what the metric returned unless it is a usable loss."""
    if not isinstance(value, Tensor):
        raise TLNoiseTypeError(f"the metric returned {_describe(value)}; {EXPECTED}")
    if not value.is_floating_point():
        raise TLNoiseTypeError(f"the metric returned {_describe(value)}; {EXPECTED}")
    if value.ndim != 0:
        raise TLNoiseValueError(
            f"the metric returned {_describe(value)}; {EXPECTED} (reduce it, e.g. with .mean())"
        )
    if not value.requires_grad:
        raise TLNoiseValueError(
            f"the metric returned {_describe(value)} that does not require grad: it does not "
            "depend on the noise (computed under torch.no_grad(), detached, or rebuilt from "
            f"numbers?); {EXPECTED}"
        )


def check_metric_output(
    model: Any, noise: NoiseHooks, data: FitData, metric: Callable, batch_size: int
) -> None:
    """Run ``metric`` once on the first batch, noise on, and check what it returns."""
    idx = torch.arange(min(batch_size, len(data)))
    batch = data.batch(idx, model_device(model))
    frozen = [p for p in model.parameters() if p.requires_grad]
    modes = {name: layer.mode for name, layer in noise.items()}
    noise.set_mode("sample")
    try:
        with torch.enable_grad():
            value = metric(frozen_forward(model, batch["tokens"], frozen), batch)
    finally:
        for name, layer in noise.items():
            layer.mode = modes[name]
    check_metric_value(value)


# ----------------------------------------------------------------------- data identity
def tensor_sha256(tensor: Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes."""
    t = tensor.detach().to("cpu").contiguous()
    digest = hashlib.sha256(f"{t.dtype} {list(t.shape)}\n".encode())
    if t.numel():
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _qualified_name(fn: Any) -> str:
    if isinstance(fn, functools.partial):
        return f"functools.partial({_qualified_name(fn.func)})"
    target = fn if hasattr(fn, "__qualname__") else type(fn)
    return f"{getattr(target, '__module__', '?')}.{target.__qualname__}"


def _lambda_source(text: str, fn: Any) -> str:
    """The lambda's own expression out of the source lines holding it (which may hold the
    rest of a call, e.g. ``steps=10``, that a resume changes); all of them if that fails."""
    if len(text) > 4000:
        return text
    code = fn.__code__
    args = code.co_varnames[: code.co_argcount]
    found = []
    for match in re.finditer(r"\blambda\b", text):
        tail = text[match.start() :]
        for end in range(len(tail), 0, -1):  # the longest prefix that is a lambda: its body
            try:
                node = ast.parse(tail[:end], mode="eval").body
            except SyntaxError:
                continue
            if isinstance(node, ast.Lambda):
                if tuple(a.arg for a in node.args.args) == args:
                    found.append(tail[:end])
                break
    return found[0] if len(found) == 1 else text


def _source(fn: Any) -> str | None:
    target = fn.func if isinstance(fn, functools.partial) else fn
    if not (inspect.isfunction(target) or inspect.ismethod(target)):
        target = type(target)  # a callable object: its class
    try:
        text = inspect.getsource(target)
    except (OSError, TypeError):
        return None
    if getattr(target, "__name__", "") == "<lambda>":
        text = _lambda_source(text, target)
    if isinstance(fn, functools.partial):
        text += f"\n# partial args {fn.args!r} {sorted(fn.keywords.items())!r}"
    return text + _closure_text(target)


def _closure_text(fn: Any) -> str:
    """The closure's simple values (numbers, strings, tensors' hashes) in a comparable form."""
    cells = getattr(getattr(fn, "__func__", fn), "__closure__", None) or ()
    parts = []
    for cell in cells:
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if isinstance(value, Tensor):
            parts.append(tensor_sha256(value))
        elif isinstance(value, (int, float, str, bool, type(None), tuple)):
            parts.append(repr(value))
    return f"\n# closure {parts!r}" if parts else ""


def metric_identity(metric: Callable) -> dict[str, Any]:
    """``{"name", "source_sha256"}`` of a metric (the hash is None when there is no source)."""
    source = _source(metric)
    return {
        "name": _qualified_name(metric),
        "source_sha256": hashlib.sha256(source.encode()).hexdigest() if source else None,
    }


def data_identity(data: FitData, metric: Callable | None) -> dict[str, Any]:
    """The ``"data"`` section of a run config: what a resume must be given again."""
    return {
        "tokens": tensor_sha256(data.tokens.long()),
        "loss_mask": tensor_sha256(data.mask),
        "extras": {k: tensor_sha256(v) for k, v in sorted(data.extras.items())},
        "metric": metric_identity(metric) if metric is not None else None,
    }


# --------------------------------------------------------------------- resuming a run
def check_resume_steps(run_dir: Any, config: FitConfig, done: int) -> None:
    if config.steps < done:
        raise TLNoiseValueError(
            f"steps={config.steps} is fewer than the {done} steps the run in {str(run_dir)!r} "
            f"has already done; pass steps >= {done} (more steps extend the run)"
        )


def completed_result(
    model: Any, noise: NoiseHooks, run_dir: Any, run_config: dict[str, Any], steps: int
) -> FitResult | None:
    """The result of a completed run resumed with its own step count (nothing to do), with its
    final noise loaded into ``noise``; None when the run still has steps to do."""
    path = Path(run_dir)
    status = read_status(path)
    old = read_json(path / CONFIG, "run config")
    old_steps = old.get("fit", {}).get("steps") if isinstance(old, dict) else None
    if not status or status.get("state") != "completed" or old_steps != steps:
        return None
    if not ((path / FINAL).is_dir() and (path / SUMMARY).is_file()):
        return None
    check_resumable(path, old, run_config)
    final = NoiseHooks.load(path / FINAL, model, attach=False)
    noise.load_state_dict(final.state_dict())
    noise.node_scores, noise.ranking_info = final.node_scores, final.ranking_info
    summary = read_json(path / SUMMARY, "run summary")
    warnings.warn(
        f"the run in {str(path)!r} has already completed its {steps} steps; nothing to do (its "
        "final noise is loaded; pass more steps to extend it)",
        UserWarning,
        stacklevel=3,
    )
    stopped = summary.get("steps_done") if summary.get("stopped_early") else None
    return FitResult(
        stds=noise.stds(),
        history=read_history(path),
        importance=safe_importance(noise),
        run_dir=path,
        node_scores=noise.node_scores,
        stopped_at=stopped,
        extra={"already_completed": True},
    )


# ------------------------------------------------------------------ around the fit
@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt in the main thread (so the run says "interrupted");
    the previous handler is restored afterwards. Elsewhere than the main thread: nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is None:  # a handler installed outside Python: leave it
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"{signal.Signals(signum).name} received")

    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def noise_settings_kept(noise: NoiseHooks) -> Iterator[None]:
    """The noise's seed, generator states, per-layer modes and train flag are restored at the
    end of the block (a fit reseeds the noise at every step and samples throughout)."""
    seed, states = noise.seed, noise.generator_states()
    modes = {name: layer.mode for name, layer in noise.items()}
    training = noise.training
    try:
        yield
    finally:
        noise.manual_seed(seed)
        if seed is not None and states:
            noise.set_generator_states(states)
        nn.Module.train(noise, training)  # the flag only: NoiseHooks.train also sets modes
        for name, layer in noise.items():
            layer.mode = modes[name]


@contextmanager
def fit_guard(noise: NoiseHooks) -> Iterator[None]:
    """:func:`sigterm_as_interrupt` and :func:`noise_settings_kept` together."""
    with ExitStack() as stack:
        stack.enter_context(noise_settings_kept(noise))
        stack.enter_context(sigterm_as_interrupt())
        yield
