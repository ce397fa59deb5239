"""Launching the dashboard: ``tl-noise app RUN_DIR_OR_RUNS_ROOT [--port N]``.

The page is :mod:`tl_noise.dashboard.app`, shipped with the package: the launcher always serves
that file (never a script found by walking up from the installed package, where a folder called
``apps`` may belong to anything). In a checkout, ``apps/dashboard.py`` is the same page for
``streamlit run apps/dashboard.py -- ROOT``.
The server is ``python -m streamlit run SCRIPT --server.port N --server.address HOST
--server.headless true --browser.gatherUsageStats false -- ROOT``.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any


def dashboard_script() -> Path:
    """The packaged page, :mod:`tl_noise.dashboard.app`."""
    import tl_noise.dashboard

    return Path(tl_noise.dashboard.__file__).resolve().parent / "app.py"


def dashboard_command(
    run_dir_or_root: str | os.PathLike, port: int = 8501, host: str = "127.0.0.1", headless=True
) -> list[str]:
    """The ``streamlit run`` command line that serves the dashboard over ``run_dir_or_root``."""
    root = Path(run_dir_or_root)
    if not root.is_dir():
        raise ValueError(f"runs root {str(root)!r} is not a directory")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"port={port!r}; expected an int in 1..65535")
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(dashboard_script()),
        "--server.port",
        str(port),
        "--server.address",
        host,
        "--server.headless",
        "true" if headless else "false",
        "--browser.gatherUsageStats",
        "false",
        "--",
        str(root.resolve()),
    ]


def launch(
    run_dir_or_root: str | os.PathLike,
    port: int = 8501,
    host: str = "127.0.0.1",
    headless: bool = True,
    block: bool = True,
) -> subprocess.Popen:
    """Serve the dashboard over a run directory or a folder of runs at ``http://host:port``.

    ``block=True`` waits until the server exits (Ctrl-C, SIGTERM or SIGHUP stops it: the
    signal is passed on to the server, which is never left running without this process);
    otherwise the running process is returned and the caller stops it (``proc.terminate()``).
    """
    try:
        import streamlit  # noqa: F401
    except ImportError as err:
        raise RuntimeError(
            "the dashboard needs the 'app' extra: pip install 'tl-noise[app]'"
        ) from err
    proc = subprocess.Popen(dashboard_command(run_dir_or_root, port, host, headless))
    if block:
        wait_forwarding_signals(proc)
    return proc


FORWARDED = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))


def wait_forwarding_signals(proc: subprocess.Popen, grace: float = 10.0) -> int:
    """Wait for ``proc``; SIGTERM/SIGHUP sent to this process are passed on to it, and Ctrl-C
    terminates it. If it has not stopped ``grace`` seconds after that, it is killed."""
    received: list[float] = []  # when a signal was passed on

    def forward(signum: int, frame: Any) -> None:
        received.append(time.monotonic())
        if proc.poll() is None:
            proc.send_signal(signum)

    main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED} if main else {}
    try:
        while True:
            try:
                return proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                if received and time.monotonic() > received[0] + grace:
                    proc.kill()  # it ignored the signal passed on
            except KeyboardInterrupt:
                if proc.poll() is None:
                    proc.terminate()
                received.append(time.monotonic())
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def cmd_app(args: argparse.Namespace) -> int:
    """``tl-noise app``: serve until stopped; Ctrl-C is a normal exit."""
    proc = launch(args.root, port=args.port, host=args.host, block=True)
    stopped = (None, 0, -signal.SIGINT, -signal.SIGTERM, -getattr(signal, "SIGHUP", 1))
    return 0 if proc.returncode in stopped else int(proc.returncode)


def add_app_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``tl-noise app RUN_DIR_OR_RUNS_ROOT [--port N] [--host H]``."""
    parser = subparsers.add_parser(
        "app",
        help="open the dashboard over a run directory or a folder of runs",
        description="Serve the Streamlit dashboard of tl-noise runs (needs the 'app' extra).",
    )
    parser.add_argument("root", metavar="RUN_DIR_OR_RUNS_ROOT", help="a run or a folder of runs")
    parser.add_argument("--port", type=int, default=8501, help="port (default 8501)")
    parser.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1)")
    parser.set_defaults(func=cmd_app)
    return parser
