"""Edge-level circuits: attribution quality on the shipped benchmark models, every method in one
run (``python -m benchmarks.edges``), and the cost of an edge-noise fit step
(``python -m benchmarks.edges.cost``).

* :mod:`~benchmarks.edges.methods`: tl-noise's edge noise (defaults), tl-noise's own edge
  attribution patching (mean and resample ablation), TransformerLens 4.3's edge attribution
  patching (:mod:`~benchmarks.edges.tl_eap`; it runs on Hugging Face-booted bridges only).
* :mod:`~benchmarks.edges.judge`: ``f`` at MIB's edge fractions, CPR and CMD, the circuit
  ``tn.extract_circuit`` needs for ``f >= 0.9``, ROC AUC against node-derived edge labels.
* :mod:`~benchmarks.edges.hf_gpt2`: a tiny GPT-2 trained for a few hundred steps on the
  induction task and booted from its ``save_pretrained`` checkpoint, where TL's tool runs.
* :mod:`~benchmarks.edges.cost`: GPT-2-small shape, one edge-noise fit step against a plain
  forward, peak memory against a frozen forward + backward, and their growth with depth.
"""
