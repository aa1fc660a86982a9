"""The architecture holds: imports go one way through the layers, and the pure layers never
import MPI (docs/design.md#layers)."""

import ast
import subprocess
import sys

import pytest

from helpers import REPO

PKG = REPO / "mpigpt2"
# lower layers never import higher ones; the top-level modules are the commands
LAYERS = {"base": 0, "model": 1, "formats": 2, "parallel": 3, "observe": 4, "": 5}
PURE = ["model/*.py", "formats/*.py", "observe/*.py", "base/*.py", "parallel/layout.py",
        "parallel/schedule.py", "parallel/costs.py", "parallel/memory.py",
        "parallel/schedule_file.py"]


def modules():
    return sorted(p for p in PKG.rglob("*.py"))


def layer_of(module):
    """Layer of a dotted module name under mpigpt2 ('mpigpt2.parallel.grid' -> 3)."""
    parts = module.split(".")
    return LAYERS.get(parts[1], 5) if len(parts) > 1 else 5


def imports(path):
    """Every module name path imports (anywhere in the file, lazy imports included)."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "mpigpt2":  # from mpigpt2 import x: x is a module
                yield from (f"mpigpt2.{a.name}" for a in node.names)
            else:
                yield node.module


def name_of(path):
    rel = path.relative_to(PKG.parent).with_suffix("")
    return ".".join(p for p in rel.parts if p != "__init__")


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_imports_go_down_the_layers(path):
    here = layer_of(name_of(path))
    bad = [m for m in imports(path) if m.startswith("mpigpt2.") and layer_of(m) > here]
    assert not bad, f"{name_of(path)} (layer {here}) imports higher layers: {bad}"


def test_pure_modules_never_import_mpi():
    pure = sorted({p for pat in PURE for p in PKG.glob(pat)})
    assert len(pure) > 20, pure  # the globs found the folders
    bad = {name_of(p): m for p in pure for m in imports(p) if m.split(".")[0] == "mpi4py"}
    assert not bad, bad


def test_layer_rule_catches_a_violation(tmp_path):
    """The checker itself: a model module importing the runtime is reported."""
    f = tmp_path / "bad.py"
    f.write_text("from mpigpt2.parallel.grid import make_grid\nimport mpi4py\n")
    assert [m for m in imports(f) if m.startswith("mpigpt2.")
            and layer_of(m) > layer_of("mpigpt2.model.bad")] == ["mpigpt2.parallel.grid"]


def test_pure_modules_import_with_mpi_blocked():
    """Importing every pure module with mpi4py made unimportable succeeds."""
    names = [name_of(p) for pat in PURE for p in sorted(PKG.glob(pat))]
    code = ("import sys, importlib; sys.modules['mpi4py'] = None; "
            "sys.modules['mpi4py.MPI'] = None\n"
            f"for n in {names!r}: importlib.import_module(n)\nprint('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.strip() == "ok", r.stderr
