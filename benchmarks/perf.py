"""Shim: ``python benchmarks/perf.py ...`` runs the :mod:`benchmarks.perf` package (see its
docstring), the same as ``python -m benchmarks.perf ...`` from the repository root."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.perf.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
