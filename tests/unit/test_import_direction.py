"""Imports run one way: provisioning and simulators import enroll_server, never the reverse.

The operator tooling (batch creation, new tokens) reaches the admin API through the
`Provisioner` the wiring passes in (enroll_server/web/provisioner.py). The one module allowed
to name the outer packages is the `fleetpki` command itself (enroll_server/cli/app.py), which
mounts every area's sub-app, and only inside its functions, so importing it loads none of them.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "enroll_server"
OUTER = ("provisioning", "simulators")
COMMAND = PACKAGE / "cli" / "app.py"


def _module(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _outer_imports(tree: ast.Module) -> list[tuple[int, str, bool]]:
    """(line, imported module, at module level) of each import that names an outer package,
    `importlib.import_module("...")` and `__import__("...")` with a literal name included."""
    found: list[tuple[int, str, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            first = node.args[0]
            if called in ("import_module", "__import__") and isinstance(first, ast.Constant):
                names = [str(first.value)]
        for name in names:
            if name.split(".")[0] in OUTER:
                found.append((getattr(node, "lineno", 0), name, top))
        inner = top and not isinstance(
            node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda | ast.ClassDef
        )
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, True)
    return found


def test_the_scan_sees_every_form_of_import() -> None:
    tree = ast.parse(
        "import provisioning.batch\n"
        "from simulators import cli\n"
        "def f():\n"
        "    from provisioning.admin import Provisioning\n"
        "    importlib.import_module('provisioning.cli')\n"
        "from enroll_server.registry import Registry\n"
    )
    assert _outer_imports(tree) == [
        (1, "provisioning.batch", True),
        (2, "simulators", True),
        (4, "provisioning.admin", False),
        (5, "provisioning.cli", False),
    ]


def test_enroll_server_does_not_import_provisioning_or_simulators() -> None:
    files = sorted(PACKAGE.rglob("*.py"))
    assert COMMAND in files and len(files) > 50  # the walk reads the package, not nothing
    wrong = []
    for path in files:
        for line, name, top in _outer_imports(ast.parse(path.read_text(), str(path))):
            if path != COMMAND or top:
                wrong.append(f"{path.relative_to(REPO)}:{line} imports {name}")
    assert wrong == []


def test_importing_enroll_server_loads_neither() -> None:
    """Every module but the `fleetpki` command, imported for real: nothing of the outer packages
    comes in, directly or through another import."""
    modules = sorted(_module(p) for p in PACKAGE.rglob("*.py") if p.name != "__main__.py")
    modules.remove("enroll_server.cli.app")
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {OUTER!r}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_mosquitto_sync_does_not_import_aiohttp() -> None:
    """The mosquitto sync process shares the CRL publisher with `fleetpki serve`, not its HTTP."""
    code = (
        "import sys\n"
        "import enroll_server.broker.mosquitto_sync, enroll_server.revocation.publisher\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'aiohttp'))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
