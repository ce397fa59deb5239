"""The ``tl-noise`` command line (:mod:`~tl_noise.cli.main`) and the dashboard launcher
(:mod:`~tl_noise.cli.app`)."""

from tl_noise.cli.main import main

__all__ = ["main"]
