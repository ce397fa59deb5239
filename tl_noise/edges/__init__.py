"""Edge-level noise: one learned std per writer -> reader edge, readers rebuilt from writers.

* :mod:`~tl_noise.edges.graph`: writers, readers and MIB's edge names (:class:`EdgeGraph`);
* :mod:`~tl_noise.edges.weights`: the projections and layer norms a rebuilt q/k/v needs;
* :mod:`~tl_noise.edges.noise`: :class:`EdgeNoise`, the hooks that rebuild every reader;
* :mod:`~tl_noise.edges.store`: the writers of one forward pass and the contraction with them;
* :mod:`~tl_noise.edges.attach`: :func:`attach_edge_noise`, :func:`edge_importance`;
* :mod:`~tl_noise.edges.circuit`: edge circuits judged with the rest ablated
  (:class:`EdgeCircuitEvaluator`, edge attribution patching) and :func:`extract_circuit`.
"""

from tl_noise.edges.attach import attach_edge_noise, edge_importance
from tl_noise.edges.circuit import EdgeCircuitEvaluator, ExtractedCircuit, extract_circuit
from tl_noise.edges.graph import EdgeGraph
from tl_noise.edges.noise import EdgeNoise

__all__ = [
    "EdgeCircuitEvaluator",
    "EdgeGraph",
    "EdgeNoise",
    "ExtractedCircuit",
    "attach_edge_noise",
    "edge_importance",
    "extract_circuit",
]
