"""Attach noise layers to the hook points of a TransformerLens model.

One mechanism serves TransformerLens 4.x ``TransformerBridge`` and 3.x ``HookedTransformer``: a
noise layer is registered on the model's ``HookPoint`` with the HookPoint's own ``add_hook`` (as a
*permanent* hook, so ``run_with_hooks``/``reset_hooks()`` leave it alone), and it returns a new
tensor, which replaces the activation. On the bridge, ``hook_z`` is a reshaped view of the output
projection's input; the HookPoint converts it to ``[batch, pos, n_heads, d_head]`` before our hook
and back afterwards, so the same layer works on both versions.

:func:`~tl_noise.hooks.attach_noise` builds the :class:`NoiseHooks`; as a context manager they
come off again at the end of the block:

>>> from tl_noise.hooks import attach_noise
>>> from tl_noise.models import load_embedded_model
>>> model = load_embedded_model()
>>> with attach_noise(model, "blocks.*.attn.hook_z", granularity="head") as noise:
...     sorted(noise.stds()), noise.mode
(['blocks.0.attn.hook_z', 'blocks.1.attn.hook_z'], 'sample')
>>> noise.attached
False
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any, cast

import torch
from jaxtyping import Int
from torch import Tensor, nn

from tl_noise.devices import model_device
from tl_noise.hooks.calibration import (
    add_permanent_hook,
    check_finite_stats,
    collect_activation_stats,
    remove_hook,
)
from tl_noise.hooks.owners import handle_registered, mark, owners
from tl_noise.hooks.saved import NOISE_FORMAT_VERSION, check_saved_config, check_saved_state
from tl_noise.hooks.selection import check_model
from tl_noise.io import atomic_write_files, json_bytes, read_json, read_tensor_file, tensor_bytes
from tl_noise.names import module_key
from tl_noise.noise.layer import NoiseLayer, check_noise_mode
from tl_noise.noise.sizing import check_noise_config_size
from tl_noise.scaling.groups import param_groups

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
NOISE_KINDS: dict[str, type[NoiseHooks]] = {}
"""Saved noise of another kind than nodes (``config["kind"]``) -> the class that loads it
(``tl_noise.edges`` registers ``"edges"``)."""
CONFIG_FILE = "noise_config.json"
STATE_FILE = "noise_state.safetensors"

CORRUPTED_KEY = "corrupted_tokens"
"""The batch key of each example's counterfactual tokens when a fit resamples its noise from
them (``tn.fit(..., corrupted_tokens=...)``, edge noise)."""


def model_fingerprint(model: Any) -> dict[str, Any]:
    """The config fields that decide whether saved noise fits a model."""
    cfg = model.cfg
    out = {}
    for field in FINGERPRINT_FIELDS:
        value = getattr(cfg, field, None)
        out[field] = value if isinstance(value, (int, float, str, bool, type(None))) else str(value)
    return out


class NoiseHooks(nn.Module):
    """Noise layers attached to a model's hook points (an ``nn.Module`` of noise parameters only).

    While attached, the activation ``x_h`` at each hook point ``h`` is replaced by
    ``NoiseLayer_h(x_h)`` (see :class:`~tl_noise.noise.layer.NoiseLayer` for the noise), with
    ``eps`` drawn from a seeded generator per device (torch's global RNG when ``seed=None``);
    ``remove()`` restores the model's outputs bit for bit.

    ``parameters()`` yields only the noise parameters, so an optimizer built from it never
    touches the model. Use as a context manager to remove the hooks on exit, also on error.
    """

    _model: Any  # the model, set with object.__setattr__ so that it is not a submodule
    kind = "nodes"  # what the stds belong to: "nodes" (hook points) or "edges"

    def __init__(self, model: Any, layers: dict[str, NoiseLayer], seed: int | None = 0) -> None:
        super().__init__()
        check_model(model)
        object.__setattr__(self, "_model", model)  # not a submodule: its weights are not ours
        self.hook_names = list(layers)
        self.layers = nn.ModuleDict({module_key(n): layer for n, layer in layers.items()})
        self.fingerprint = model_fingerprint(model)
        self.calibration_source = "none"
        self._handles: list[tuple[Any, Any]] = []
        self._generators: dict[str, torch.Generator] = {}
        self.seed = seed
        # the ranking tl_noise.fit derived (path, refinement), read by node_importance
        self.node_scores: dict[str, float] | None = None
        self.ranking_info: dict[str, Any] | None = None

    # ------------------------------------------------------------ attachment
    @property
    def model(self) -> Any:
        return self._model

    @property
    def attached(self) -> bool:
        """Whether every hook is on the model (``model.reset_hooks(including_permanent=True)``
        takes them off)."""
        return bool(self._handles) and all(handle_registered(*h) for h in self._handles)

    def layer(self, name: str) -> NoiseLayer:
        return cast(NoiseLayer, self.layers[module_key(name)])  # __init__ puts only NoiseLayers

    def items(self) -> Iterator[tuple[str, NoiseLayer]]:
        for name in self.hook_names:
            yield name, self.layer(name)

    def attach(self) -> NoiseHooks:
        """Put the noise on the model; ValueError if another ``NoiseHooks`` is on one of the
        hook points (two noises on one activation would silently change each other)."""
        if self.attached:
            return self
        self.remove()  # hooks someone else took off (reset_hooks(including_permanent=True))
        taken = [
            name
            for name in self.hook_names
            if any(o is not self for o in owners(self._model.hook_dict[name]))
        ]
        if taken:
            raise ValueError(
                f"hook point(s) {taken} already carry tl-noise noise from another NoiseHooks; "
                "remove it first (noise.remove()) or put the noise of both in one attach_noise"
            )
        try:
            for name, layer in self.items():
                point = self._model.hook_dict[name]
                handle = add_permanent_hook(point, self._hook_fn(layer))
                self._handles.append((point, handle))
                mark(point, handle, self)
        except BaseException:
            self.remove()  # all or nothing: never leave some hooks behind
            raise
        return self

    def remove(self) -> None:
        """Remove every hook this object added; the model computes exactly what it did before."""
        while self._handles:
            remove_hook(*self._handles.pop())

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
            layer.check_activation(activation.shape)  # a clear error, not a reshape's
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
            generator = self.generator(torch.device(key))
            if generator is None:
                raise ValueError(
                    "cannot restore noise generator states: these hooks have seed=None and draw "
                    "from torch's global RNG; call manual_seed(seed) first"
                )
            generator.set_state(state)

    @property
    def mode(self) -> str:
        modes = {layer.mode for _, layer in self.items()}
        return modes.pop() if len(modes) == 1 else "mixed"

    def set_mode(self, mode: str) -> NoiseHooks:
        """``"sample"`` (noise on), ``"mean"`` (only the learned mean shift) or ``"off"``."""
        checked = check_noise_mode(mode)
        for _, layer in self.items():
            layer.mode = checked
        return self

    def batch_context(self, batch: dict[str, Tensor]) -> AbstractContextManager[Any]:
        """What the fit's noised forward of ``batch`` runs within (nothing here; edge noise
        replaces its ablated edges by the batch's :data:`CORRUPTED_KEY` contributions)."""
        return nullcontext()

    @contextmanager
    def switched_off(self) -> Iterator[NoiseHooks]:
        """Within the block the model computes its clean outputs; every layer's own mode
        (``sample``/``mean``/``off``, also when they differ) is restored afterwards."""
        saved = {name: layer.mode for name, layer in self.items()}
        self.set_mode("off")
        try:
            yield self
        finally:
            for name, layer in self.items():
                layer.mode = saved[name]

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
    def ranking_scores(self) -> dict[str, float]:
        """What a fit watches to stop once its ranking holds: ``-log std`` per node here
        (per edge for edge noise)."""
        from tl_noise.hooks.importance import std_node_scores

        return std_node_scores(self)

    def stds(self) -> dict[str, Tensor]:
        """Hook name -> current std (detached, CPU float32), shaped as the granularity."""
        with torch.no_grad():
            return {name: layer.std().detach().float().cpu() for name, layer in self.items()}

    def calibrate(self, tokens: Int[Tensor, "n pos"], batch_size: int = 16) -> None:
        """Set each layer's natural scale to its activations' std on ``tokens`` (noise off)."""
        with self.switched_off():
            stats = collect_activation_stats(self._model, self.hook_names, tokens, batch_size)
        check_finite_stats(stats, self.hook_names)
        for name, layer in self.items():
            device = layer.natural_scale.device
            layer.set_natural_scale(stats[name]["std"].to(device), stats[name]["mean"].to(device))
        self.calibration_source = "data"

    # ------------------------------------------------------------ save/load
    def config(self) -> dict[str, Any]:
        return {
            "format": "tl-noise/noise-hooks",
            "version": NOISE_FORMAT_VERSION,
            "hooks": {name: layer.to_config() for name, layer in self.items()},
            "order": self.hook_names,
            "fingerprint": self.fingerprint,
            "seed": self.seed,
            "calibration_source": self.calibration_source,
            "node_scores": self.node_scores,
            "ranking_info": self.ranking_info,
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
        kind = config.get("kind", "nodes")
        if kind != cls.kind:
            if kind not in NOISE_KINDS:
                raise ValueError(f"tl-noise noise config of unknown kind {kind!r}")
            return NOISE_KINDS[kind].from_config(config, model)
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
        device = model_device(model)
        hooks = cls(model, layers, seed=config.get("seed", 0)).to(device)
        hooks.calibration_source = config.get("calibration_source", "none")
        hooks.node_scores, hooks.ranking_info = _read_ranking(config)
        return hooks

    @classmethod
    def load(cls, path: str | Path, model: Any, attach: bool = True) -> NoiseHooks:
        """Load noise saved with :meth:`save` onto ``model`` (never unpickles)."""
        path = Path(path)
        config = read_json(path / CONFIG_FILE, "noise config")
        expected = check_saved_config(config, path / CONFIG_FILE)
        check_noise_config_size(config, str(path / CONFIG_FILE))  # before anything is allocated
        try:
            hooks = cls.from_config(config, model)
        except ValueError as err:
            raise ValueError(f"cannot load the noise in {str(path)!r}: {err}") from err
        own = hooks.state_dict()  # the state file may hold at most these tensors, as float64
        limit = sum(8 * max(1, v.numel()) for v in own.values())
        why = "the size of the noise its config describes"
        data, state = read_tensor_file(path / STATE_FILE, "noise state", limit, why)
        if expected and hashlib.sha256(data).hexdigest() != expected:  # the bytes read once
            raise ValueError(f"{str(path / STATE_FILE)!r} does not match its config (checksum)")
        check_saved_state(state, own, path)
        hooks.load_state_dict(state)
        return hooks.attach() if attach else hooks

    def __repr__(self) -> str:
        head = f"NoiseHooks({len(self.hook_names)} hooks, attached={self.attached}"
        return head + f", mode={self.mode})"


def _read_ranking(config: dict[str, Any]) -> tuple[dict[str, float] | None, dict[str, Any] | None]:
    """The fitted ranking saved with the noise (absent in noise saved before it existed)."""
    scores = config.get("node_scores")
    if scores is not None:
        ok = isinstance(scores, dict) and all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
            for k, v in scores.items()
        )
        if not ok:
            raise ValueError("malformed tl-noise noise config: node_scores is not {node: number}")
        scores = {k: float(v) for k, v in scores.items()}
    info = config.get("ranking_info")
    return scores, info if isinstance(info, dict) else None
