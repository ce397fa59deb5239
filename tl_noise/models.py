"""Loading TransformerLens models: hub names, local checkpoints, native configs, the embedded model.

Works with TransformerLens 4.x (``TransformerBridge``) and 3.x (``HookedTransformer``). Weights of
the native models tl-noise builds are exchanged in TransformerLens 3.x's canonical layout
(``W_Q: [n_heads, d_model, d_head]``, ``W_O: [n_heads, d_head, d_model]``, ``W_U: [d_model,
d_vocab]``), which :func:`canonical_state_dict` / :func:`load_canonical_state_dict` translate to and
from the 4.x native module's ``nn.Linear`` layout.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any

import einops
import torch
from torch import Tensor

from tl_noise.io import read_json, read_tensors

DATA_DIR = Path(__file__).parent / "data"
EMBEDDED_MODEL = "induction-2l"


def transformer_lens_major() -> int:
    """Major version of the installed TransformerLens (3 or 4)."""
    return int(importlib.metadata.version("transformer-lens").split(".")[0])


def load_model(
    name_or_path: str,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    **kwargs: Any,
) -> Any:
    """Load a pretrained model by hub name (``"gpt2"``) or local checkpoint directory.

    On TransformerLens 4.x this is ``TransformerBridge.boot_transformers(name_or_path, ...)``; a
    directory written with ``save_pretrained`` (model + tokenizer) loads exactly like a hub name.
    On 3.x it is ``HookedTransformer.from_pretrained``. The name ``"induction-2l"`` gives the
    embedded model (:func:`load_embedded_model`).
    """
    if not isinstance(name_or_path, (str, Path)) or not str(name_or_path):
        raise TypeError(f"name_or_path={name_or_path!r}; expected a hub name or a directory")
    name = str(name_or_path)
    if name == EMBEDDED_MODEL:
        return load_embedded_model(device=device)
    if transformer_lens_major() >= 4:
        from transformer_lens import TransformerBridge

        return TransformerBridge.boot_transformers(name, device=device, dtype=dtype, **kwargs)
    from transformer_lens import HookedTransformer

    if Path(name).is_dir():
        return _load_local_hooked_transformer(name, device, dtype or torch.float32)
    return HookedTransformer.from_pretrained(
        name, device=device, dtype=dtype or torch.float32, **kwargs
    )


def _load_local_hooked_transformer(path: str, device: Any, dtype: torch.dtype) -> Any:
    # TransformerLens 3.x's from_pretrained insists on an official model name; its loading
    # helpers accept a local directory, so follow the same steps with the path.
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as loading
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = loading.get_pretrained_model_config(path, device=device, dtype=dtype, fold_ln=True)
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    state = loading.get_pretrained_state_dict(path, cfg, hf_model, dtype=dtype)
    model = HookedTransformer(cfg, AutoTokenizer.from_pretrained(path), move_to_device=False)
    model.load_and_process_state_dict(
        state, fold_ln=True, center_writing_weights=True, center_unembed=True
    )
    model.move_model_modules_to_device()
    return model


def build_native_model(config: dict[str, Any], device: str | None = None) -> Any:
    """A randomly initialised TransformerLens model from a plain config dict, offline.

    4.x: ``transformer_lens.model_bridge.sources.native.boot(TransformerBridgeConfig(**config))``;
    3.x: ``HookedTransformer(HookedTransformerConfig(**config))``.
    """
    config = dict(config)
    if transformer_lens_major() >= 4:
        from transformer_lens import TransformerBridgeConfig
        from transformer_lens.model_bridge.sources.native import boot

        return boot(TransformerBridgeConfig(**config), device=device)
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    if config.get("attn_only"):
        config.setdefault("act_fn", None)
    model = HookedTransformer(HookedTransformerConfig(**config))
    return model.to(device) if device else model


def _layout_map(cfg: Any) -> dict[str, tuple[str, Any, Any]]:
    # 4.x native key -> (3.x key, to-3.x transform, to-4.x transform)
    h = cfg.n_heads

    def to3_qkv(w: Tensor) -> Tensor:
        return einops.rearrange(w, "(h d) m -> h m d", h=h)

    def to4_qkv(w: Tensor) -> Tensor:
        return einops.rearrange(w, "h m d -> (h d) m")

    mapping: dict[str, tuple[str, Any, Any]] = {
        "embed.weight": ("embed.W_E", lambda w: w, lambda w: w),
        "pos_embed.weight": ("pos_embed.W_pos", lambda w: w, lambda w: w),
        "unembed.weight": ("unembed.W_U", lambda w: w.T, lambda w: w.T),
        "unembed.bias": ("unembed.b_U", lambda w: w, lambda w: w),
    }
    for layer in range(cfg.n_layers):
        p = f"blocks.{layer}.attn"
        for x in "qkv":
            mapping[f"{p}.{x}.weight"] = (f"{p}.W_{x.upper()}", to3_qkv, to4_qkv)
            mapping[f"{p}.{x}.bias"] = (
                f"{p}.b_{x.upper()}",
                lambda b: b.reshape(h, -1),
                lambda b: b.reshape(-1),
            )
        mapping[f"{p}.o.weight"] = (
            f"{p}.W_O",
            lambda w: einops.rearrange(w, "m (h d) -> h d m", h=h),
            lambda w: einops.rearrange(w, "h d m -> m (h d)"),
        )
        mapping[f"{p}.o.bias"] = (f"{p}.b_O", lambda b: b, lambda b: b)
    return mapping


def canonical_state_dict(model: Any) -> dict[str, Tensor]:
    """The weights of an attention-only native model in TransformerLens 3.x's layout."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if transformer_lens_major() < 4:
        return {k: v for k, v in state.items() if not k.endswith((".mask", ".IGNORE"))}
    out = {}
    for key, (name3, to3, _) in _layout_map(model.cfg).items():
        out[name3] = to3(state[key]).contiguous()
    return out


def load_canonical_state_dict(model: Any, state: dict[str, Tensor]) -> None:
    """Load weights in TransformerLens 3.x's layout into a native model of either version."""
    if transformer_lens_major() < 4:
        model.load_state_dict(state, strict=False)
        return
    converted = {key: to4(state[name3]) for key, (name3, _, to4) in _layout_map(model.cfg).items()}
    model.load_state_dict(converted, strict=True)


def load_embedded_model(device: str | torch.device | None = None) -> Any:
    """The embedded 2-layer attention-only induction model (see ``scripts/train_embedded.py``).

    Returns a TransformerLens model (bridge on 4.x) with the attribute ``ground_truth`` set to
    the head labels recorded when it was trained: ``{"previous_token": [[layer, head], ...],
    "induction": [[layer, head], ...]}``.
    """
    meta = read_json(DATA_DIR / f"{EMBEDDED_MODEL}.json", "embedded model config")
    state = read_tensors(DATA_DIR / f"{EMBEDDED_MODEL}.safetensors", "embedded model weights")
    model = build_native_model(meta["config"])
    load_canonical_state_dict(model, {k: v.float() for k, v in state.items()})
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if device is not None:
        model = model.to(device)
    model.ground_truth = meta["ground_truth"]
    model.tl_noise_name = EMBEDDED_MODEL
    return model


def model_name(model: Any) -> str:
    """A human-readable name for a model (for run configs)."""
    for attr in ("tl_noise_name",):
        if getattr(model, attr, None):
            return str(getattr(model, attr))
    cfg = model.cfg
    return str(getattr(cfg, "model_name", None) or type(model).__name__)
