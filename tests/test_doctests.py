"""Every ``>>>`` example in the package's docstrings runs and shows what it prints.

The modules are found by reading ``tl_noise/**.py`` (every package, those added later included):
each module with a docstring holding a ``>>>`` prompt is imported and its examples run with
:mod:`doctest` (``ELLIPSIS`` and ``NORMALIZE_WHITESPACE`` on). An example that cannot run
cheaply and offline is written without prompts, as a plain ``::`` code block.
"""

from __future__ import annotations

import ast
import doctest
import importlib
import io
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.tl3

PACKAGE = Path(__file__).resolve().parents[1] / "tl_noise"
PROMPT = re.compile(r"^\s*>>>", re.M)
# Optional dependencies a module may import at import time: tl_noise.dashboard's Streamlit pages
# (views.py, app.py) import streamlit, which only the app extra installs. Such a module is
# skipped where the dependency is missing, never where it is installed.
OPTIONAL = {"streamlit", "plotly", "pandas"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def docstrings(tree: ast.Module):
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            text = ast.get_docstring(node, clean=False)
            if text:
                yield text


def modules_with_examples() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        text = path.read_text()
        if ">>>" in text and any(PROMPT.search(d) for d in docstrings(ast.parse(text))):
            found.append(module_name(path))
    return found


MODULES = modules_with_examples()


def test_the_scan_finds_examples():
    assert "tl_noise.ranking" in MODULES and "tl_noise.errors" in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name and err.name.split(".")[0] in OPTIONAL:
            pytest.skip(f"{name} needs {err.name}, not installed here")
        raise
    tests = [t for t in doctest.DocTestFinder().find(module, name) if t.examples]
    assert tests, f"{name}: '>>>' in a docstring that doctest does not reach (a nested function?)"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report = io.StringIO()
    for test in tests:
        runner.run(test, out=report.write)
    assert runner.failures == 0, f"{name}: failing docstring examples\n{report.getvalue()}"
