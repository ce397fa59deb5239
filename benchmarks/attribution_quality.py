"""Node-level attribution quality: ``python benchmarks/attribution_quality.py [ARGS]`` runs
``python -m benchmarks.quality [ARGS]`` (tl-noise beside every baseline on the zoo's benchmark
models, judged against the exact optimum; see :mod:`benchmarks.quality`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.quality.__main__ import main  # noqa: E402

if __name__ == "__main__":
    main()
