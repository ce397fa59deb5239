"""Width-aware initialisation and learning-rate scales for the noise model's own parameters.

* :mod:`~tl_noise.scaling.parametrizations`: the *parametrizations* SP, NTP and muP (Tensor
  Programs V): per-tensor init scales and optimizer learning-rate multipliers, so a learning rate
  tuned on a small model transfers to a wide one. Not to be confused with
  :mod:`tl_noise.noise.parameterizations`, the rho -> std maps.
* :mod:`~tl_noise.scaling.groups`: a parametrization applied to tensors: ``ParamSpec``,
  optimizer ``param_groups``, ``init_``/``initialize`` (re-exported by ``parametrizations``).
* :mod:`~tl_noise.scaling.init`: fan-in/fan-out in TransformerLens' weight layouts, Kaiming and
  Xavier initialisation.
"""

from tl_noise.scaling.parametrizations import (
    MaximalUpdate,
    NeuralTangent,
    Parametrization,
    Standard,
)

__all__ = ["MaximalUpdate", "NeuralTangent", "Parametrization", "Standard"]
