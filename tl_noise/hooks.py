"""Attach noise layers to the hook points of a TransformerLens model.

One mechanism serves TransformerLens 4.x ``TransformerBridge`` and 3.x ``HookedTransformer``: a
noise layer is registered on the model's ``HookPoint`` with the HookPoint's own ``add_hook`` (as a
*permanent* hook, so ``run_with_hooks``/``reset_hooks()`` leave it alone), and it returns a new
tensor, which replaces the activation. On the bridge, ``hook_z`` is a reshaped view of the output
projection's input; the HookPoint converts it to ``[batch, pos, n_heads, d_head]`` before our hook
and back afterwards, so the same layer works on both versions.

>>> noise = attach_noise(model, "blocks.*.attn.hook_z", granularity="head")
>>> noise.stds()["blocks.0.attn.hook_z"].shape      # [n_heads]
>>> noise.remove()                                   # outputs are bit-identical to before
"""

from __future__ import annotations

import copy
import difflib
import fnmatch
import hashlib
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor, nn

from tl_noise.covariance import FactorizedCovariance
from tl_noise.io import atomic_write_files, json_bytes, read_json, read_tensors, tensor_bytes
from tl_noise.layers import NOISE_MODES, NoiseLayer, RhoEstimator, param_shape_for
from tl_noise.parameterizations import StandardDeviationParameterization
from tl_noise.parametrizations import param_groups

HookSpec = str | Iterable[str] | Callable[[str], bool]
FINGERPRINT_FIELDS = (
    "n_layers",
    "d_model",
    "n_heads",
    "d_head",
    "d_mlp",
    "d_vocab",
    "n_ctx",
    "attn_only",
    "n_key_value_heads",
    "act_fn",
    "normalization_type",
    "positional_embedding_type",
)
UNSUPPORTED_HOOKS = ("hook_pattern", "hook_attn_scores")
CONFIG_FILE = "noise_config.json"
STATE_FILE = "noise_state.safetensors"


def check_model(model: Any) -> None:
    """TypeError unless ``model`` is a TransformerLens model (has ``hook_dict`` and ``cfg``)."""
    if not (hasattr(model, "hook_dict") and hasattr(model, "cfg") and isinstance(model, nn.Module)):
        raise TypeError(
            f"expected a TransformerLens model (TransformerBridge or HookedTransformer), got "
            f"{type(model).__name__}; load one with tl_noise.load_model(name_or_path)"
        )


def check_tokens(model: Any, tokens: Any, what: str = "tokens") -> None:
    """TypeError/ValueError naming the problem unless ``tokens`` is a non-empty ``[n, pos]``
    integer tensor of ids in ``[0, d_vocab)`` on a real device."""
    kind = f"{what} must be an int tensor [n, pos]"
    if not isinstance(tokens, Tensor):
        raise TypeError(f"{kind}, got {type(tokens).__name__}")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise TypeError(f"{kind}, got dtype {tokens.dtype}")
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


def _check_finite_stats(stats: dict[str, dict[str, Any]], names: list[str]) -> None:
    bad = [n for n in names if n in stats and not bool(torch.isfinite(stats[n]["std"]).all())]
    if bad:
        raise FloatingPointError(
            f"the model's activations at {bad} are not finite (NaN/inf) on the calibration "
            "tokens; check the model's weights and dtype"
        )


def model_fingerprint(model: Any) -> dict[str, Any]:
    """The config fields that decide whether saved noise fits a model."""
    cfg = model.cfg
    out = {}
    for field in FINGERPRINT_FIELDS:
        value = getattr(cfg, field, None)
        out[field] = value if isinstance(value, (int, float, str, bool, type(None))) else str(value)
    return out


def _hook_name_preference(name: str) -> tuple[bool, int]:
    # The bridge lists a HookPoint under its module path ("blocks.0.attn.o.hook_in") and under
    # the TransformerLens 3.x name ("blocks.0.attn.hook_z"); prefer the latter, which both share.
    return (name.endswith((".hook_in", ".hook_out")), len(name))


def resolve_hook_names(model: Any, hooks: HookSpec) -> list[str]:
    """Expand exact names, glob patterns (``"blocks.*.attn.hook_z"``) or a predicate.

    Names that refer to the same HookPoint (the bridge's aliases) are kept once. Unknown names
    raise a ValueError listing the closest valid names.
    """
    check_model(model)
    hook_dict = model.hook_dict
    all_names = list(hook_dict)
    if callable(hooks) and not isinstance(hooks, str):
        matched = [n for n in all_names if hooks(n)]
        if not matched:
            raise ValueError(f"the hook predicate {hooks!r} selected no hook point of the model")
    else:
        try:
            specs = [hooks] if isinstance(hooks, str) else list(hooks)
        except TypeError:
            specs = []
        if not specs or not all(isinstance(s, str) for s in specs):
            raise TypeError(
                f"hooks={hooks!r}; expected a name, a glob pattern, a list, or a callable"
            )
        matched = []
        for spec in specs:
            found = (
                fnmatch.filter(all_names, spec)
                if any(c in spec for c in "*?[")
                else ([spec] if spec in hook_dict else [])
            )
            if not found:
                close = difflib.get_close_matches(spec, all_names, n=5, cutoff=0.5)
                hint = f"; closest: {', '.join(close)}" if close else ""
                raise ValueError(f"unknown hook point {spec!r}{hint}")
            matched.extend(n for n in found if n not in matched)
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


def _add_permanent_hook(point: Any, fn: Callable) -> Any:
    before = [id(h) for h in point.fwd_hooks]
    handle = point.add_hook(fn, dir="fwd", is_permanent=True)
    if handle is None:  # TransformerLens 3.x returns nothing; find the handle it appended
        handle = next(h for h in point.fwd_hooks if id(h) not in before)
    return handle


def _remove_hook(point: Any, handle: Any) -> None:
    handle.hook.remove()
    point.fwd_hooks[:] = [h for h in point.fwd_hooks if h is not handle]


def _layer_key(name: str) -> str:
    return name.replace(".", "__")


def default_probe_tokens(model: Any, n: int = 8, pos: int = 32, seed: int = 0) -> Tensor:
    """Uniformly random tokens ``[n, pos]`` (pos capped at ``n_ctx``) to probe shapes/scales."""
    gen = torch.Generator().manual_seed(seed)
    pos = min(pos, int(model.cfg.n_ctx))
    return torch.randint(0, int(model.cfg.d_vocab), (n, pos), generator=gen)


def _model_device(model: Any) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def collect_activation_stats(
    model: Any,
    names: list[str],
    tokens: Int[Tensor, "n pos"],
    batch_size: int = 16,
    require_all: bool = True,
) -> dict[str, dict[str, Any]]:
    """Run the model on ``tokens`` and return, per hook, shape, device, dtype and unit std.

    A hook that does not fire is an error when ``require_all``, else it is left out.
    """
    stats: dict[str, dict[str, Any]] = {}

    def make(name: str) -> Callable:
        def fn(act: Tensor, hook: Any) -> None:
            x = act.detach().reshape(-1, *act.shape[2:]).double()
            s = stats.setdefault(
                name,
                {
                    "shape": tuple(act.shape),
                    "device": act.device,
                    "dtype": act.dtype,
                    "n": 0,
                    "sum": 0.0,
                    "sumsq": 0.0,
                },
            )
            s["n"] += x.shape[0]
            s["sum"] = s["sum"] + x.sum(0)
            s["sumsq"] = s["sumsq"] + (x * x).sum(0)

        return fn

    handles = [
        (model.hook_dict[n], _add_permanent_hook(model.hook_dict[n], make(n))) for n in names
    ]
    try:
        device = _model_device(model)
        for start in range(0, tokens.shape[0], batch_size):
            model(tokens[start : start + batch_size].to(device))
    finally:
        for point, handle in handles:
            _remove_hook(point, handle)
    for name in names:
        if name not in stats and require_all:
            hint = ""
            if name.endswith("hook_result"):
                hint = " (hook_result fires only after model.set_use_attn_result(True))"
            raise ValueError(f"hook point {name!r} did not fire in a forward pass{hint}")
        if name not in stats:
            continue
        s = stats[name]
        mean = s["sum"] / s["n"]
        s["std"] = (s["sumsq"] / s["n"] - mean * mean).clamp(min=0).sqrt().float().cpu()
    return stats


class NoiseHooks(nn.Module):
    """Noise layers attached to a model's hook points (an ``nn.Module`` of noise parameters only).

    ``parameters()`` yields only the noise parameters, so an optimizer built from it never
    touches the model. Use as a context manager to remove the hooks on exit, also on error.
    """

    def __init__(self, model: Any, layers: dict[str, NoiseLayer], seed: int | None = 0) -> None:
        super().__init__()
        check_model(model)
        object.__setattr__(self, "_model", model)  # not a submodule: its weights are not ours
        self.hook_names = list(layers)
        self.layers = nn.ModuleDict({_layer_key(n): layer for n, layer in layers.items()})
        self.fingerprint = model_fingerprint(model)
        self.calibration_source = "none"
        self._handles: list[tuple[Any, Any]] = []
        self._generators: dict[str, torch.Generator] = {}
        self.seed = seed

    # ------------------------------------------------------------ attachment
    @property
    def model(self) -> Any:
        return self._model

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def layer(self, name: str) -> NoiseLayer:
        return self.layers[_layer_key(name)]

    def items(self) -> Iterator[tuple[str, NoiseLayer]]:
        for name in self.hook_names:
            yield name, self.layer(name)

    def attach(self) -> NoiseHooks:
        if self.attached:
            return self
        try:
            for name, layer in self.items():
                point = self._model.hook_dict[name]
                self._handles.append((point, _add_permanent_hook(point, self._hook_fn(layer))))
        except BaseException:
            self.remove()  # all or nothing: never leave some hooks behind
            raise
        return self

    def remove(self) -> None:
        """Remove every hook this object added; the model computes exactly what it did before."""
        while self._handles:
            _remove_hook(*self._handles.pop())

    def __enter__(self) -> NoiseHooks:
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def _hook_fn(self, layer: NoiseLayer) -> Callable:
        def noise_hook(activation: Tensor, hook: Any) -> Tensor:
            if activation.device != layer.natural_scale.device:
                raise ValueError(
                    f"the noise layer at {layer.name!r} is on {layer.natural_scale.device} but "
                    f"the activation there is on {activation.device}; attach the noise after "
                    "moving the model (each layer follows its hook's device)"
                )
            return layer(activation, generator=self.generator(activation.device))

        return noise_hook

    # ------------------------------------------------------------- sampling
    def set_batch_shard(self, offset: int, global_batch: int) -> None:
        """Draw noise as rows ``offset:offset+b`` of a ``global_batch`` draw (data parallel)."""
        for _, layer in self.items():
            layer.batch_shard = (offset, global_batch)

    def clear_batch_shard(self) -> None:
        for _, layer in self.items():
            layer.batch_shard = None

    def manual_seed(self, seed: int | None) -> None:
        """Seed the noise: the same seed gives identical noise; ``None`` uses torch's global RNG."""
        self.seed = seed
        self._generators.clear()

    def generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[key]

    def generator_states(self) -> dict[str, Tensor]:
        return {k: g.get_state() for k, g in self._generators.items()}

    def set_generator_states(self, states: dict[str, Tensor]) -> None:
        for key, state in states.items():
            self.generator(torch.device(key)).set_state(state)

    @property
    def mode(self) -> str:
        modes = {layer.mode for _, layer in self.items()}
        return modes.pop() if len(modes) == 1 else "mixed"

    def set_mode(self, mode: str) -> NoiseHooks:
        """``"sample"`` (noise on), ``"mean"`` (only the learned mean shift) or ``"off"``."""
        if mode not in NOISE_MODES:
            raise ValueError(f"mode={mode!r}; accepted: {', '.join(NOISE_MODES)}")
        for _, layer in self.items():
            layer.mode = mode
        return self

    def train(self, mode: bool = True) -> NoiseHooks:
        """``train()`` samples noise; ``eval()`` disables it (like dropout)."""
        super().train(mode)
        return self.set_mode("sample" if mode else "off")

    def param_groups(self, lr: float, optimizer: str = "Adam") -> list[dict[str, Any]]:
        """Optimizer param groups: rhos/means at ``lr``, covariance factors at ``lr`` times their
        ``lr_scaling``, estimator networks at the lr scales of their parametrization."""
        if not (isinstance(lr, (int, float)) and lr > 0 and lr < float("inf")):
            raise ValueError(f"lr={lr!r}; expected a finite number > 0")
        groups: list[dict[str, Any]] = []
        for name, layer in self.items():
            for pname, param, mult in layer.plain_parameters():
                groups.append({"params": [param], "lr": lr * mult, "name": f"{name}.{pname}"})
            if layer.estimator is not None:
                est = layer.estimator
                for group in param_groups(est.param_specs(), lr, optimizer, est.parametrization):
                    group["name"] = f"{name}.estimator.{group['name']}"
                    groups.append(group)
        return groups

    # ------------------------------------------------------------------ stds
    def stds(self) -> dict[str, Tensor]:
        """Hook name -> current std (detached, CPU float32), shaped as the granularity."""
        with torch.no_grad():
            return {name: layer.std().detach().float().cpu() for name, layer in self.items()}

    def calibrate(self, tokens: Int[Tensor, "n pos"], batch_size: int = 16) -> None:
        """Set each layer's natural scale to its activations' std on ``tokens`` (noise off)."""
        saved = {name: layer.mode for name, layer in self.items()}
        self.set_mode("off")
        try:
            stats = collect_activation_stats(self._model, self.hook_names, tokens, batch_size)
        finally:
            for name, layer in self.items():
                layer.mode = saved[name]
        _check_finite_stats(stats, self.hook_names)
        for name, layer in self.items():
            layer.set_natural_scale(stats[name]["std"].to(layer.natural_scale.device))
        self.calibration_source = "data"

    # ------------------------------------------------------------ save/load
    def config(self) -> dict[str, Any]:
        return {
            "format": "tl-noise/noise-hooks",
            "version": 1,
            "hooks": {name: layer.to_config() for name, layer in self.items()},
            "order": self.hook_names,
            "fingerprint": self.fingerprint,
            "seed": self.seed,
            "calibration_source": self.calibration_source,
        }

    def save(self, path: str | Path) -> Path:
        """Write ``noise_config.json`` and ``noise_state.safetensors`` into directory ``path``."""
        path = Path(path)
        state = tensor_bytes(dict(self.state_dict()))
        config = self.config()
        config["state_sha256"] = hashlib.sha256(state).hexdigest()
        # both files are written out before either is renamed into place: a failed write (a
        # full disk) leaves a previously saved pair intact
        atomic_write_files({path / STATE_FILE: state, path / CONFIG_FILE: json_bytes(config)})
        return path

    @classmethod
    def from_config(cls, config: dict[str, Any], model: Any) -> NoiseHooks:
        """Rebuild (unattached, freshly initialised) noise hooks for ``model`` from a config."""
        check_model(model)
        if not isinstance(config, dict) or config.get("format") != "tl-noise/noise-hooks":
            raise ValueError("not a tl-noise noise config (missing format 'tl-noise/noise-hooks')")
        for key, kind in (("fingerprint", dict), ("order", list), ("hooks", dict)):
            if not isinstance(config.get(key), kind):
                raise ValueError(
                    f"malformed tl-noise noise config: {key!r} is {config.get(key)!r}, expected "
                    f"a JSON {'object' if kind is dict else 'list'}"
                )
        unlisted = [n for n in config["order"] if n not in config["hooks"]]
        if unlisted:
            raise ValueError(f"malformed tl-noise noise config: no settings for hooks {unlisted}")
        mismatch = {
            k: (v, model_fingerprint(model).get(k))
            for k, v in config["fingerprint"].items()
            if model_fingerprint(model).get(k) != v
        }
        if mismatch:
            detail = ", ".join(
                f"{k}: saved {a!r} vs model {b!r}"
                for k, a, b in ((k, *v) for k, v in mismatch.items())
            )
            raise ValueError(f"the saved noise does not fit this model ({detail})")
        missing = [n for n in config["order"] if n not in model.hook_dict]
        if missing:
            raise ValueError(
                f"the model has no hook point(s) {missing} that the noise was saved for"
            )
        try:
            layers = {
                n: NoiseLayer.from_config(config["hooks"][n], name=n) for n in config["order"]
            }
        except (KeyError, TypeError, AttributeError) as err:
            raise ValueError(
                f"malformed tl-noise noise config: bad layer settings ({err!r})"
            ) from err
        device = _model_device(model)
        hooks = cls(model, layers, seed=config.get("seed", 0)).to(device)
        hooks.calibration_source = config.get("calibration_source", "none")
        return hooks

    @classmethod
    def load(cls, path: str | Path, model: Any, attach: bool = True) -> NoiseHooks:
        """Load noise saved with :meth:`save` onto ``model`` (never unpickles)."""
        path = Path(path)
        config = read_json(path / CONFIG_FILE, "noise config")
        state = read_tensors(path / STATE_FILE, "noise state")
        expected = config.get("state_sha256") if isinstance(config, dict) else None
        if expected and hashlib.sha256((path / STATE_FILE).read_bytes()).hexdigest() != expected:
            raise ValueError(f"{str(path / STATE_FILE)!r} does not match its config (checksum)")
        try:
            hooks = cls.from_config(config, model)
        except ValueError as err:
            raise ValueError(f"cannot load the noise in {str(path)!r}: {err}") from err
        own = hooks.state_dict()
        bad = sorted(set(own) ^ set(state))
        if bad:
            raise ValueError(f"noise state in {str(path)!r} has missing/unexpected tensors: {bad}")
        for key, value in state.items():
            if tuple(value.shape) != tuple(own[key].shape):
                raise ValueError(
                    f"noise state tensor {key!r} has shape {list(value.shape)}, expected "
                    f"{list(own[key].shape)}"
                )
        hooks.load_state_dict(state)
        return hooks.attach() if attach else hooks

    def __repr__(self) -> str:
        head = f"NoiseHooks({len(self.hook_names)} hooks, attached={self.attached}"
        return head + f", mode={self.mode})"


def attach_noise(
    model: Any,
    hooks: HookSpec,
    granularity: str = "auto",
    parameterization: StandardDeviationParameterization | None = None,
    init_std: float = 0.05,
    covariance: Callable[[], FactorizedCovariance] | None = None,
    learn_mean: bool = False,
    per_position: bool = False,
    estimator: bool | dict[str, Any] = False,
    relative: bool = True,
    calibration_tokens: Int[Tensor, "n pos"] | None = None,
    seed: int | None = 0,
) -> NoiseHooks:
    """Insert learnable noise at the selected hook points of ``model`` and return the hooks.

    Args:
        model: a TransformerLens ``TransformerBridge`` (4.x) or ``HookedTransformer`` (3.x).
        hooks: exact hook names, glob patterns (``"blocks.*.attn.hook_z"``) or a predicate.
        granularity: ``"head"``, ``"head_feature"``, ``"feature"``, ``"hook"``, or ``"auto"``
            (``"head"`` for ``[batch, pos, n_heads, d]`` activations, else ``"feature"``).
        parameterization: rho -> std map, shared by all layers (default Cloak ``(1e-4, 2)``).
        init_std: initial std (relative to the natural scale unless ``relative=False``).
        covariance: a factory (e.g. ``lambda: KroneckerCovariance(2, 4)``) giving each layer
            its own structured covariance; ``None`` for independent noise.
        learn_mean: also learn a mean shift per parameter.
        per_position: one std per position as well (up to the calibration tokens' length).
        estimator: estimate rhos from the activation with a small network (``True`` or a dict
            of :class:`~tl_noise.layers.RhoEstimator` arguments).
        relative: scale noise by each unit's natural std measured on ``calibration_tokens``
            (uniformly random tokens if none are given; :func:`tl_noise.fit` recalibrates on
            its data in that case).
        seed: seed of the noise generator (``None``: torch's global RNG).

    Shapes are checked now, with a probe forward pass, not at the first training step.
    """
    check_model(model)
    if parameterization is not None and not isinstance(
        parameterization, StandardDeviationParameterization
    ):
        raise TypeError(
            f"parameterization={parameterization!r}; expected a StandardDeviationParameterization "
            "(e.g. tl_noise.CloakStandardDeviationParameterization()) or None"
        )
    names = resolve_hook_names(model, hooks)
    source = "data" if calibration_tokens is not None else "random"
    if calibration_tokens is None:
        calibration_tokens = default_probe_tokens(model)
    check_tokens(model, calibration_tokens, "calibration_tokens")
    explicit = isinstance(hooks, str) and not any(c in hooks for c in "*?[")
    explicit = explicit or (
        not callable(hooks)
        and not isinstance(hooks, str)
        and all(not any(c in h for c in "*?[") for h in hooks)
    )
    unsupported = [n for n in names if n.endswith(UNSUPPORTED_HOOKS)]
    if unsupported and explicit:
        raise ValueError(
            f"noise on attention scores/patterns is not supported ({unsupported}); their shape "
            "[batch, n_heads, query, key] changes with the sequence length. Noise hook_z instead."
        )
    names = [n for n in names if n not in unsupported]
    stats = collect_activation_stats(model, names, calibration_tokens, require_all=explicit)
    _check_finite_stats(stats, names)
    silent = [n for n in names if n not in stats]
    if silent:
        warnings.warn(f"skipping hook points that never fire: {silent}", stacklevel=2)
    names = [n for n in names if n in stats]
    if not names:
        raise ValueError(f"none of the hook points selected by {hooks!r} fires in a forward pass")
    layers = {}
    for name in names:
        shape = stats[name]["shape"]
        if len(shape) < 3:
            raise ValueError(
                f"hook point {name!r} has activation shape {list(shape)}; tl-noise "
                "needs [batch, pos, ...] activations"
            )
        unit = tuple(shape[2:])
        gran = granularity
        if gran == "auto":
            gran = "head" if len(unit) == 2 and name.split(".")[-1] != "hook_pattern" else "feature"
        est = None
        if estimator:
            kwargs = estimator if isinstance(estimator, dict) else {}
            n_out = max(1, int(torch.Size(param_shape_for(unit, gran, name)).numel()))
            est = RhoEstimator(int(torch.Size(unit).numel()), n_out, **kwargs)
        layer = NoiseLayer(
            unit,
            granularity=gran,
            parameterization=copy.deepcopy(parameterization),
            init_std=init_std,
            covariance=covariance() if covariance is not None else None,
            learn_mean=learn_mean,
            n_positions=calibration_tokens.shape[1] if per_position else None,
            estimator=est,
            relative=relative,
            name=name,
        )
        layer.set_natural_scale(stats[name]["std"])
        layers[name] = layer.to(stats[name]["device"])
    noise = NoiseHooks(model, layers, seed=seed)
    noise.calibration_source = source
    return noise.attach()


def describe(noise: NoiseHooks) -> str:
    """One line per hook: name, granularity, std shape and mean std."""
    lines = []
    for name, std in noise.stds().items():
        layer = noise.layer(name)
        lines.append(f"{name}: {layer.granularity} {list(std.shape)} mean std {std.mean():.4g}")
    return "\n".join(lines)


__all__ = [
    "NoiseHooks",
    "attach_noise",
    "collect_activation_stats",
    "describe",
    "model_fingerprint",
    "resolve_hook_names",
]
