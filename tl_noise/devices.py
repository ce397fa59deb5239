"""Where a model lives: the one device helper of the package."""

from __future__ import annotations

from typing import Any

import torch


def model_device(model: Any) -> torch.device:
    """The device of ``model``'s first parameter (CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
