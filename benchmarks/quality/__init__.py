"""Node-level attribution quality: tl-noise beside every baseline, judged against the exact optimum.

Run ``.venv/bin/python -m benchmarks.quality`` (or ``benchmarks/attribution_quality.py``).
"""
