"""The ``tl-noise`` command line: ``demo``, ``fit``, ``show`` and ``app``.

tl-noise demo                       # tl-noise beside the baselines on a benchmark model
tl-noise fit gpt2 --task ioi --hooks "blocks.*.attn.hook_z" --steps 300 --run-dir runs/ioi
tl-noise show runs/ioi              # ranked heads in the terminal
tl-noise app runs/                  # the dashboard on http://127.0.0.1:8501
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

PARAMETERIZATIONS = ("cloak", "direct", "softplus")  # CLI names of the rho -> std maps


def make_parameterization(
    name: str, scale: tuple[float, float] | None, shallow: float, form: str = "additive"
) -> Any:
    """Build a std parameterization from its CLI name; ``scale`` None: ``(1e-4, 2)`` for the
    additive form, ``(1e-4, 1)`` for the replacement form (whose sigma is capped at 1)."""
    import tl_noise as tn

    low, high = scale if scale is not None else (1e-4, 1.0 if form == "replacement" else 2.0)
    if name == "cloak":
        return tn.CloakStandardDeviationParameterization(scale=(low, high), shallow=shallow)
    if name == "direct":
        return tn.DirectStandardDeviationParameterization(scale=(low, high))
    if name == "softplus":
        return tn.SoftplusStandardDeviationParameterization(min_scale=low)
    raise ValueError(f"parameterization={name!r}; accepted: {', '.join(PARAMETERIZATIONS)}")


def ranking_table(
    ranking: list[dict[str, Any]], ground_truth: dict[str, list] | None, top: int
) -> str:
    """The ranked heads as a text table, with the ground-truth role of each head when known."""
    roles = {}
    for role, heads in (ground_truth or {}).items():
        for layer, head in heads:
            roles[(layer, head)] = role
    lines = [f"{'rank':>4}  {'head':>6}  {'std':>9}  {'importance':>10}  ground truth"]
    for rank, row in enumerate(ranking[:top], start=1):
        name = f"L{row['layer']}H{row['head']}"
        role = roles.get((row["layer"], row["head"]), "-" if ground_truth else "")
        lines.append(
            f"{rank:>4}  {name:>6}  {row['std']:>9.4g}  {row['importance']:>10.3f}  {role}"
        )
    return "\n".join(lines)


def _default_run_dir(prefix: str) -> Path:
    return Path("runs") / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"


HOOKS_DEFAULT = ["blocks.*.attn.hook_z"]


def _argparse_type(default: Any) -> Any:
    return float if isinstance(default, float) else int if isinstance(default, int) else str


def add_config_arguments(parser: argparse.ArgumentParser, **defaults: Any) -> None:
    """One ``--option`` per :class:`~tl_noise.fitting.FitConfig` setting (``batch_size`` ->
    ``--batch-size``), with its help text and default; ``defaults`` overrides a default."""
    from tl_noise.fitting import FitConfig

    for name, default, meta in FitConfig.settings():
        default = defaults.get(name, default)
        kind = meta.get("type") or _argparse_type(default)
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            type=kind,
            default=default,
            choices=meta.get("choices"),
            help=meta["help"],
        )


def config_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`~tl_noise.fitting.FitConfig` settings from parsed arguments."""
    from tl_noise.fitting import FitConfig

    return {name: getattr(args, name) for name, _, _ in FitConfig.settings()}


def _common_fit_args(
    parser: argparse.ArgumentParser, steps: int, hooks: list[str] | None = None
) -> None:
    from tl_noise.hooks.attach import DEFAULT_FORM
    from tl_noise.noise.forms import NOISE_FORMS

    parser.add_argument(
        "--hooks", nargs="+", default=hooks or HOOKS_DEFAULT, help="hook names or glob patterns"
    )
    parser.add_argument(
        "--form",
        default=DEFAULT_FORM,
        choices=NOISE_FORMS,
        help="additive (x + sigma s eps) or replacement ((1 - sigma) x + sigma (mu + s eps))",
    )
    parser.add_argument(
        "--granularity",
        default="auto",
        choices=["auto", "head", "head_feature", "feature", "hook"],
        help="one std per head, per head and feature, per feature, or per hook",
    )
    parser.add_argument(
        "--parameterization",
        default="cloak",
        choices=PARAMETERIZATIONS,
        help="rho -> std map of the noise",
    )
    parser.add_argument(
        "--scale",
        nargs=2,
        type=float,
        default=None,
        metavar=("MIN", "MAX"),
        help="std range of the parameterization (default 1e-4 2, or 1e-4 1 for replacement)",
    )
    parser.add_argument("--shallow", type=float, default=1.0, help="Cloak temperature")
    add_config_arguments(parser, steps=steps)
    parser.add_argument("--n-examples", type=int, default=256, help="generated task examples")
    parser.add_argument("--run-dir", type=Path, default=None, help="default: runs/<name>-<time>")
    parser.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
    parser.add_argument("--force", action="store_true", help="replace a run already in --run-dir")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _fit_from_args(
    model: Any, task: Any, args: argparse.Namespace, prefix: str, add_curve: bool = True
) -> Any:
    import tl_noise as tn
    from tl_noise.fitting import fit

    scale = tuple(args.scale) if args.scale is not None else None
    param = make_parameterization(args.parameterization, scale, args.shallow, args.form)
    noise = tn.attach_noise(
        model,
        args.hooks,
        granularity=args.granularity,
        parameterization=param,
        calibration_tokens=task.tokens[:64],
        seed=args.seed,
        form=args.form,
    )
    run_dir = args.run_dir or _default_run_dir(prefix)
    with noise:
        result = fit(
            model,
            noise,
            task,
            run_dir=run_dir,
            resume=args.resume,
            overwrite=args.force,
            quiet=args.quiet,
            **config_kwargs(args),
        )
    if add_curve and result.importance is not None and result.run_dir is not None:
        add_faithfulness(model, task, result)
    return result


def add_faithfulness(model: Any, task: Any, result: Any) -> None:
    """Record the faithfulness curve of the learned ranking in the run's summary.json."""
    from tl_noise.evaluation import faithfulness_curve
    from tl_noise.io import read_json, write_json

    try:
        curve = faithfulness_curve(model, task, result.importance)
    except ValueError as err:  # e.g. ablating every head changes nothing
        print(f"faithfulness curve skipped: {err}")
        return
    path = Path(result.run_dir) / "summary.json"
    summary = read_json(path, "run summary")
    summary["faithfulness"] = {"k": curve["ks"], **curve}
    write_json(path, summary)


def cmd_fit(args: argparse.Namespace) -> int:
    import tl_noise as tn
    from tl_noise.ranking import rank_heads
    from tl_noise.tasks import make_task

    check_device(args.device)
    check_model_path(args.model)
    model = tn.load_model(args.model, device=args.device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    kwargs: dict[str, Any] = {"seed": args.seed}
    if args.task == "text":
        if args.text_file is None:
            raise SystemExit("tl-noise fit: --task text needs --text-file PATH")
        kwargs["path"] = args.text_file
    else:
        kwargs["n"] = args.n_examples
    task = make_task(args.task, model, **kwargs)
    result = _fit_from_args(model, task, args, f"{args.task}")
    print(ranking_table(rank_heads(result.importance), getattr(model, "ground_truth", None), 20))
    print(f"\nrun directory: {result.run_dir}")
    return 0


def check_device(device: str | None) -> None:
    """ValueError naming ``--device`` when this torch build or machine does not have it."""
    import torch

    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"--device {device!r}: {err}") from None
    available = {
        "cuda": torch.cuda.is_available,
        "mps": lambda: torch.backends.mps.is_available(),
    }.get(dev.type, lambda: True)
    if not available():
        raise ValueError(
            f"--device {device!r}: {dev.type} is not available (this torch build has no "
            f"{dev.type} support or no such device is visible); use --device cpu"
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device!r}: there are {torch.cuda.device_count()} CUDA devices")


def check_model_path(name: str) -> None:
    """A model given as a path (``./m``, ``/m``, ``~/m``) must exist."""
    if name.startswith((".", "/", "~")) and not Path(name).expanduser().exists():
        raise ValueError(f"model path {name!r} does not exist")


def cmd_show(args: argparse.Namespace) -> int:
    from tl_noise.io import read_json
    from tl_noise.runs.format import config_problem

    run = Path(args.run_dir)
    summary = read_json(run / "summary.json", "run summary")
    config = read_json(run / "config.json", "run config")
    problem = config_problem(config) or ("" if isinstance(summary, dict) else "summary")
    try:
        if problem:
            raise ValueError(problem)
        fit = config.get("fit") or {}
        print(
            f"run {args.run_dir}: model {config['model'].get('name')}, mode {fit.get('mode')}, "
            f"objective {fit.get('objective')}, {fit.get('steps')} steps"
        )
        ground_truth = config["model"].get("ground_truth")
        print(ranking_table(summary.get("ranking") or [], ground_truth, args.top))
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"run {str(run)!r} is damaged ({type(err).__name__}: {err})") from None
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tl-noise", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    formatter = argparse.ArgumentDefaultsHelpFormatter
    sub = parser.add_subparsers(dest="command", required=True)

    from tl_noise.cli.demo import add_demo_parser

    add_demo_parser(sub, _common_fit_args, formatter)

    fitp = sub.add_parser("fit", formatter_class=formatter, help="fit noise on any model and task")
    fitp.add_argument("model", help="hub name (gpt2), local checkpoint directory, or induction-2l")
    fitp.add_argument(
        "--task", default="induction", choices=["induction", "ioi", "greater_than", "text"]
    )
    fitp.add_argument("--text-file", type=Path, default=None, help="text for --task text")
    fitp.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ...")
    _common_fit_args(fitp, steps=500)
    fitp.set_defaults(func=cmd_fit)

    show = sub.add_parser("show", formatter_class=formatter, help="print the ranked heads of a run")
    show.add_argument("run_dir", type=Path)
    show.add_argument("--top", type=int, default=20)
    show.set_defaults(func=cmd_show)

    from tl_noise.cli.export import add_export_parser

    add_export_parser(sub)

    try:
        from tl_noise.cli.app import add_app_parser
    except ImportError:  # the dashboard extra is not installed
        pass
    else:
        add_app_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, OSError) as err:  # OSError: a model that cannot be loaded
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"tl-noise {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
