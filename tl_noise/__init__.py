"""tl-noise: learned Gaussian noise at TransformerLens hook points.

Attach noise layers to a model's hook points, fit them so the noise is as large as possible while
the model's behaviour is preserved, and read off which heads the behaviour depends on:

>>> import tl_noise as tn
>>> model = tn.load_embedded_model()  # or any TransformerLens model: tn.load_model("gpt2")
>>> noise = tn.attach_noise(model, "blocks.*.attn.hook_z", granularity="head")
>>> tn.head_importance(noise).shape  # [n_layers, n_heads], higher = more important
torch.Size([2, 4])
>>> noise.remove()

``tn.fit(model, noise, task)`` fits the noise on a task (``tl_noise.tasks``).

Data flows one way: model -> hooks -> noise layers -> objective -> trainer -> run directory ->
dashboard / notebooks.
"""

from tl_noise.edges import EdgeNoise, attach_edge_noise, edge_importance, extract_circuit
from tl_noise.errors import TLNoiseError
from tl_noise.fitting import FitResult, fit
from tl_noise.fitting.projection import (
    alphaless_gradient,
    calculate_equivalent_alpha_and_scaling_factor,
    order_tensors_by_norm,
    project_out_smaller_tensor,
    vector_projection,
)
from tl_noise.hooks import (
    NoiseHooks,
    attach_noise,
    head_importance,
    node_importance,
    resolve_hook_names,
)
from tl_noise.models import build_native_model, load_embedded_model, load_model
from tl_noise.noise import NoiseLayer, RhoEstimator
from tl_noise.noise.covariance import (
    DiagonalCovariance,
    FactorizedCovariance,
    GaussianNoise,
    KroneckerCovariance,
    LowRankCovariance,
)
from tl_noise.noise.parameterizations import (
    CloakStandardDeviationParameterization,
    DirectStandardDeviationParameterization,
    ScaledStandardDeviationParameterization,
    SoftplusStandardDeviationParameterization,
    StandardDeviationParameterization,
)
from tl_noise.runs.circuits import load_circuit, save_circuit
from tl_noise.scaling.parametrizations import (
    MaximalUpdate,
    NeuralTangent,
    Parametrization,
    Standard,
)
from tl_noise.tasks import Task

__version__ = "0.1.0"  # the only place the version is spelled (pyproject.toml reads it)

__all__ = [
    "attach_edge_noise",
    "edge_importance",
    "extract_circuit",
    "CloakStandardDeviationParameterization",
    "DiagonalCovariance",
    "EdgeNoise",
    "DirectStandardDeviationParameterization",
    "FactorizedCovariance",
    "FitResult",
    "GaussianNoise",
    "KroneckerCovariance",
    "LowRankCovariance",
    "MaximalUpdate",
    "NeuralTangent",
    "NoiseHooks",
    "NoiseLayer",
    "Parametrization",
    "RhoEstimator",
    "ScaledStandardDeviationParameterization",
    "SoftplusStandardDeviationParameterization",
    "Standard",
    "TLNoiseError",
    "Task",
    "StandardDeviationParameterization",
    "alphaless_gradient",
    "attach_noise",
    "build_native_model",
    "fit",
    "calculate_equivalent_alpha_and_scaling_factor",
    "head_importance",
    "load_embedded_model",
    "load_circuit",
    "load_model",
    "node_importance",
    "order_tensors_by_norm",
    "project_out_smaller_tensor",
    "resolve_hook_names",
    "save_circuit",
    "vector_projection",
]
