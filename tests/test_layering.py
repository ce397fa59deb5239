"""The package's shape: imports go down the layers only, and no module or folder grows too big.

Layers, lowest first (``tl_noise/__init__.py``, the public face, may import anything):

0. shared leaves: ``io``, ``names``, ``ranking``, ``devices``, ``errors``, ``registry``
1. ``noise``, ``scaling``
2. ``hooks``, ``tasks``, ``models``
3. ``runs``
4. ``fitting``
5. ``evaluation``
6. ``cli``, ``dashboard``

A module may import from its own layer or lower ones (packages of one layer may import each
other: ``noise`` may import ``scaling``). Every import counts, wherever it stands: at the top, in
a function, under ``if TYPE_CHECKING:``, relative, or ``importlib.import_module("tl_noise...")``.
Importing the package root (``import tl_noise``) pulls in every layer, so it counts as the top.
The check reads the source (``ast``); it imports nothing.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tl_noise"

LAYERS: dict[str, int] = {
    # 0: shared leaves. tl_noise.registry (named choices: modes, objectives, ...) imports only
    # tl_noise.errors and serves every layer above, so it is a leaf too.
    "tl_noise.io": 0,
    "tl_noise.names": 0,
    "tl_noise.ranking": 0,
    "tl_noise.devices": 0,
    "tl_noise.errors": 0,
    "tl_noise.registry": 0,
    "tl_noise.noise": 1,
    "tl_noise.scaling": 1,
    "tl_noise.hooks": 2,
    "tl_noise.edges": 2,  # edge noise: hooks that rebuild every reader from its writers
    "tl_noise.tasks": 2,
    "tl_noise.models": 2,
    "tl_noise.zoo": 2,  # benchmark models with their tasks and labels
    "tl_noise.runs": 3,
    "tl_noise.fitting": 4,
    "tl_noise.evaluation": 5,
    "tl_noise.cli": 6,
    "tl_noise.dashboard": 6,
}
TOP = max(LAYERS.values())  # the layer of ``import tl_noise`` (its __init__ imports them all)

# Size limits (the contract; split a module or fold leaves into a package rather than raise them):
MAX_TOP_LEVEL_MODULES = 8  # .py files directly in tl_noise/, not counting __init__.py
MAX_MODULE_LINES = 450  # lines of any tl_noise/**.py


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def part_of(module: str) -> str | None:
    """The key of :data:`LAYERS` that ``module`` belongs to (``tl_noise`` itself: itself)."""
    if module == "tl_noise":
        return module
    for key in LAYERS:
        if module == key or module.startswith(key + "."):
            return key
    return None


def layer_of(module: str) -> int | None:
    part = part_of(module)
    return TOP if part == "tl_noise" else None if part is None else LAYERS[part]


def exists(module: str) -> bool:
    path = PACKAGE.parent.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` for every import of a tl_noise module in the file, anywhere in it."""
    here = module_name(path)
    package = here if is_package(path) else here.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from .x import y / from .. import z
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:  # `from tl_noise import io` imports the module tl_noise.io
                sub = f"{source}.{alias.name}"
                found.append((node.lineno, sub if exists(sub) else source))
        elif isinstance(node, ast.Call) and (name := dynamic_import(node)):
            found.append((node.lineno, name))
    return sorted((line, m) for line, m in found if m == "tl_noise" or m.startswith("tl_noise."))


def dynamic_import(call: ast.Call) -> str | None:
    """The module of ``importlib.import_module("...")`` / ``__import__("...")``, else None."""
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if name not in ("import_module", "__import__") or not call.args:
        return None
    first = call.args[0]
    return first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else None


def sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def describe(layer: int | None, module: str) -> str:
    part = part_of(module)
    return f"layer {layer} ({part})" if layer is not None else "no layer"


def test_every_module_has_a_layer():
    unplaced = sorted(
        {
            module_name(p)
            for p in sources()
            if p != PACKAGE / "__init__.py" and layer_of(module_name(p)) is None
        }
    )
    assert not unplaced, (
        "modules in no layer (add them to LAYERS in tests/test_layering.py):\n  "
        + "\n  ".join(unplaced)
    )


def layering_violations() -> list[str]:
    """``file:line: imports M [layer of M] from layer of the file`` for each upward import."""
    violations = []
    for path in sources():
        if path == PACKAGE / "__init__.py":  # the public face may import anything
            continue
        here = module_name(path)
        mine = layer_of(here)
        if mine is None:
            continue  # reported by test_every_module_has_a_layer
        for line, module in imported_modules(path):
            theirs = layer_of(module)
            if theirs is None or theirs > mine:
                where = path.relative_to(PACKAGE.parent)
                violations.append(
                    f"{where}:{line}: imports {module} [{describe(theirs, module)}] "
                    f"from {describe(mine, here)}"
                )
    return violations


def test_imports_go_down_the_layers():
    violations = layering_violations()
    assert not violations, (
        f"{len(violations)} import(s) against the layering (a module may import its own layer "
        "or lower ones; see tests/test_layering.py):\n  " + "\n  ".join(violations)
    )


def test_top_level_module_count():
    modules = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert len(modules) <= MAX_TOP_LEVEL_MODULES, (
        f"{len(modules)} modules directly in tl_noise/ (at most {MAX_TOP_LEVEL_MODULES}): "
        f"{', '.join(modules)}; move some into a package"
    )


def test_module_length():
    long = []
    for path in sources():
        n = len(path.read_text().splitlines())
        if n > MAX_MODULE_LINES:
            long.append(f"{path.relative_to(PACKAGE.parent)}: {n} lines")
    assert not long, f"modules over {MAX_MODULE_LINES} lines (split them):\n  " + "\n  ".join(long)


# ---------------------------------------------------------------- the checker checks itself
def test_the_checker_sees_every_kind_of_import(tmp_path, monkeypatch):
    pkg = tmp_path / "tl_noise"
    (pkg / "runs").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "runs" / "__init__.py").write_text("")
    (pkg / "io.py").write_text("")
    (pkg / "runs" / "reader.py").write_text(
        "import os\n"
        "from tl_noise import io\n"
        "from tl_noise.fitting import fit\n"
        "def f():\n"
        "    import tl_noise.cli.main\n"
        "    from ..evaluation.metrics import roc_auc\n"
        "    from . import writer\n"
        "    return importlib.import_module('tl_noise.dashboard.app')\n"
        "if TYPE_CHECKING:\n"
        "    import tl_noise\n"
    )
    monkeypatch.setitem(globals(), "PACKAGE", pkg)
    assert imported_modules(pkg / "runs" / "reader.py") == [
        (2, "tl_noise.io"),
        (3, "tl_noise.fitting"),
        (5, "tl_noise.cli.main"),
        (6, "tl_noise.evaluation.metrics"),
        (7, "tl_noise.runs"),
        (8, "tl_noise.dashboard.app"),
        (10, "tl_noise"),
    ]
    assert [layer_of(m) for _, m in imported_modules(pkg / "runs" / "reader.py")] == [
        0, 4, 6, 5, 3, 6, TOP,
    ]  # fmt: skip
    assert layering_violations() == [
        "tl_noise/runs/reader.py:3: imports tl_noise.fitting [layer 4 (tl_noise.fitting)] "
        "from layer 3 (tl_noise.runs)",
        "tl_noise/runs/reader.py:5: imports tl_noise.cli.main [layer 6 (tl_noise.cli)] "
        "from layer 3 (tl_noise.runs)",
        "tl_noise/runs/reader.py:6: imports tl_noise.evaluation.metrics "
        "[layer 5 (tl_noise.evaluation)] from layer 3 (tl_noise.runs)",
        "tl_noise/runs/reader.py:8: imports tl_noise.dashboard.app [layer 6 (tl_noise.dashboard)] "
        "from layer 3 (tl_noise.runs)",
        "tl_noise/runs/reader.py:10: imports tl_noise [layer 6 (tl_noise)] "
        "from layer 3 (tl_noise.runs)",
    ]
