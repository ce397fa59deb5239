"""``python -m benchmarks.perf``."""

from benchmarks.perf.cli import main

main()
