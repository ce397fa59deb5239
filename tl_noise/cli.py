"""The ``tl-noise`` command line."""

from __future__ import annotations

import argparse
import sys


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    import tl_noise as tn

    model = tn.build_native_model(
        dict(
            n_layers=2,
            d_model=64,
            n_heads=4,
            d_head=16,
            d_vocab=64,
            n_ctx=32,
            attn_only=True,
            seed=0,
        )
    )
    tokens = torch.randint(0, 64, (8, 32), generator=torch.Generator().manual_seed(0))
    with tn.attach_noise(
        model, "blocks.*.attn.hook_z", granularity="head", calibration_tokens=tokens
    ) as noise:
        print(tn.hooks.describe(noise))
        print("head importance [layer, head]:\n", tn.head_importance(noise))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tl-noise", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the main job on the embedded model")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
