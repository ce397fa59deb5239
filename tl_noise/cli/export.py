"""``tl-noise export RUN_DIR --format mib``: a run's circuit as MIB's circuit JSON.

No model is loaded: the graph comes from the run's config (the model's fingerprint), the scores
from its fitted noise (edge runs: ``-log std`` per edge) or its summary (node runs: the fitted
node ranking). Which edges are in the circuit: the top ``--size`` ranked, or (default) the
smallest size whose faithfulness, measured at the end of the fit, reaches ``--target``; a node
run marks its top ``--size`` nodes (default: every scored node).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

FORMATS = ("mib",)


def add_export_parser(sub: Any) -> None:
    formatter = argparse.ArgumentDefaultsHelpFormatter
    export = sub.add_parser(
        "export", formatter_class=formatter, help="write a run's circuit as MIB circuit JSON"
    )
    export.add_argument("run_dir", type=Path, help="a run directory written by tl-noise fit")
    export.add_argument("--format", default="mib", choices=FORMATS, help="the file format")
    export.add_argument(
        "-o",
        "--output",
        type=Path,
        default=None,
        help="file to write (default RUN_DIR/circuit.json)",
    )
    export.add_argument("--size", type=int, default=None, help="edges (or nodes) in the circuit")
    export.add_argument(
        "--target",
        type=float,
        default=0.9,
        help="edge runs without --size: the smallest measured circuit reaching this faithfulness",
    )
    export.set_defaults(func=cmd_export)


def _model_cfg(run: Any) -> dict[str, Any]:
    fingerprint = run.config["model"]["fingerprint"]
    return {
        "n_layers": fingerprint["n_layers"],
        "n_heads": fingerprint["n_heads"],
        "d_model": fingerprint.get("d_model") or 0,
        "attn_only": bool(fingerprint.get("attn_only")),
        # an edge run's graph says; a node circuit's file has no edges for it to change
        "parallel_attn_mlp": run.is_edge_run() and run.edge_graph().parallel,
    }


def edge_size_for_target(run: Any, target: float) -> tuple[int, float | None]:
    """``(size, measured f)``: the smallest size of the run's measured curve reaching ``target``
    (every edge, with f unknown, when none does or none was measured)."""
    curve = run.edge_curve()
    n_edges = run.edge_graph().n_edges
    if curve:
        for k, f in zip(curve["k"], curve["faithfulness"], strict=True):
            if f >= target:
                return int(k), float(f)
    return n_edges, None


def cmd_export(args: argparse.Namespace) -> int:
    from tl_noise.runs import load_run

    if not 0 < args.target <= 1:
        raise ValueError(f"--target {args.target!r}; expected a number in (0, 1]")
    run = load_run(args.run_dir)
    output = args.output or Path(args.run_dir) / "circuit.json"
    print((_export_edges if run.is_edge_run() else _export_nodes)(run, output, args))
    return 0


def _export_edges(run: Any, output: Path, args: argparse.Namespace) -> str:
    from tl_noise.runs.circuits import save_circuit

    scores = run.edge_scores()
    measured = None
    size = args.size
    if size is None:
        size, measured = edge_size_for_target(run, args.target)
    save_circuit(scores, output, _model_cfg(run), size=size)
    note = f" (measured faithfulness {measured:.3f})" if measured is not None else ""
    return f"wrote {output}: {size} of {len(scores)} edges in the circuit{note}"


def _export_nodes(run: Any, output: Path, args: argparse.Namespace) -> str:
    from tl_noise.runs.circuits import save_circuit

    scores: Any = (run.summary() or {}).get("node_importance")
    if not isinstance(scores, dict) or not scores:
        raise ValueError(f"run {str(run.path)!r} has no node_importance in summary.json")
    save_circuit(scores, output, _model_cfg(run), size=args.size)
    kept = len(scores) if args.size is None else args.size
    return f"wrote {output}: {kept} of {len(scores)} nodes in the circuit"
