"""The noise itself: rho -> std maps, covariance structures and the noise layer.

* :mod:`~tl_noise.noise.parameterizations`: *standard-deviation parameterizations*, maps from an
  unconstrained ``rho`` to a std (Cloak, Direct, Softplus). Not to be confused with
  :mod:`tl_noise.scaling`, the width-aware *parametrizations* (SP/NTP/muP).
* :mod:`~tl_noise.noise.covariance`: Gaussian noise with factorized covariance (diagonal,
  low-rank; Kronecker in :mod:`~tl_noise.noise.kronecker`, re-exported by ``covariance``).
* :mod:`~tl_noise.noise.layer`: :class:`NoiseLayer`, the module that noises one activation, and
  :class:`RhoEstimator`, the small network that predicts rhos from the activation.
"""

from tl_noise.noise.covariance import (
    DiagonalCovariance,
    FactorizedCovariance,
    GaussianNoise,
    KroneckerCovariance,
    LowRankCovariance,
)
from tl_noise.noise.estimator import RhoEstimator
from tl_noise.noise.layer import NoiseLayer
from tl_noise.noise.parameterizations import (
    CloakStandardDeviationParameterization,
    DirectStandardDeviationParameterization,
    ScaledStandardDeviationParameterization,
    SoftplusStandardDeviationParameterization,
    StandardDeviationParameterization,
)

__all__ = [
    "CloakStandardDeviationParameterization",
    "DiagonalCovariance",
    "DirectStandardDeviationParameterization",
    "FactorizedCovariance",
    "GaussianNoise",
    "KroneckerCovariance",
    "LowRankCovariance",
    "NoiseLayer",
    "RhoEstimator",
    "ScaledStandardDeviationParameterization",
    "SoftplusStandardDeviationParameterization",
    "StandardDeviationParameterization",
]
