"""Loading a benchmark's canonical weights (TransformerLens 3.x layout, MLPs included) into a
model of either TransformerLens version, frozen, as every zoo loader does."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from tl_noise.models import build_native_model, load_canonical_state_dict, transformer_lens_major


def _mlp_weights(n_layers: int, state: dict[str, Tensor]) -> dict[str, Tensor]:
    # The MLP half of the canonical layout in the 4.x native module's nn.Linear layout.
    out = {}
    for layer in range(n_layers):
        p = f"blocks.{layer}.mlp"
        out.update(
            {
                f"{p}.in.weight": state[f"{p}.W_in"].T,
                f"{p}.in.bias": state[f"{p}.b_in"],
                f"{p}.out.weight": state[f"{p}.W_out"].T,
                f"{p}.out.bias": state[f"{p}.b_out"],
            }
        )
    return {k: v.contiguous() for k, v in out.items()}


class _Capture:
    """Stands in for a model to collect what :func:`load_canonical_state_dict` would load."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.state: dict[str, Tensor] = {}

    def load_state_dict(self, state: dict[str, Tensor], strict: bool = True) -> None:
        self.state.update(state)


def load_weights(model: Any, state: dict[str, Tensor]) -> None:
    """Load canonical (TransformerLens 3.x layout) weights, MLPs included, into a native model;
    ValueError unless ``state`` fills every weight of the model exactly.

    :func:`tl_noise.models.load_canonical_state_dict` translates embeddings and attention (and
    loads 3.x weights as they are); the 4.x MLP weights are translated here.
    """
    if transformer_lens_major() < 4:
        expected = {k for k in model.state_dict() if not k.endswith((".mask", ".IGNORE"))}
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or extra:
            raise ValueError(
                f"benchmark weights do not fit the model: missing {missing}, extra {extra}"
            )
        load_canonical_state_dict(model, state)
        return
    capture = _Capture(model.cfg)
    load_canonical_state_dict(capture, state)
    try:
        if any(".mlp." in k for k in state):
            capture.state.update(_mlp_weights(model.cfg.n_layers, state))
        model.load_state_dict(capture.state, strict=True)
    except (RuntimeError, KeyError) as err:
        raise ValueError(f"benchmark weights do not fit the model: {err}") from err


def frozen_model(
    config: dict[str, Any], weights: dict[str, Tensor], device: str | torch.device | None,
    name: str,
) -> Any:  # fmt: skip
    """A native model of ``config`` with ``weights`` (:func:`load_weights`), in eval mode, every
    parameter frozen, on ``device`` (None: CPU), named ``name`` in run configs."""
    model = build_native_model(config)
    load_weights(model, weights)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if device is not None:
        model = model.to(device)
    model.tl_noise_name = name
    return model
