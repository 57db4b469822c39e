"""The layering the package's folders promise, checked on the source (asyncpg's
``test__sourcecode`` spirit): each sub-package's ``__init__`` states its rule; this enforces it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "pglogrepl_bridge"

#: sans-IO packages: no sockets, waiting, threads, clocks, connections, CLI or SQL (render may
#: use rich to lay out text for a console it is handed)
SANS_IO = ("pgoutput", "wire", "render")
#: pure modules inside packages that also hold IO (jetstream: the rules of the stream; sinks:
#: the reduction of a batch to net changes)
SANS_IO_MODULES = ("jetstream/naming.py", "jetstream/entries.py", "sinks/reduce.py")
FORBIDDEN_IN_SANS_IO = {
    "socket", "select", "selectors", "ssl", "threading", "asyncio", "time", "typer",
    "sqlalchemy", "psycopg.connection", "psycopg.connection_async", "pglogrepl_bridge.postgres",
    "pglogrepl_bridge.bridge", "pglogrepl_bridge.sinks", "pglogrepl_bridge.cli",
}  # fmt: skip


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_typer_only_in_cli(path: Path) -> None:
    if path.relative_to(PACKAGE).parts[0] == "cli":
        return
    assert not any(m == "typer" or m.startswith("typer.") for m in _imports(path))
    assert "signal" not in _imports(path) or path.name == "postgres.py"  # testing: child reaping


@pytest.mark.parametrize(
    "path",
    [
        p
        for p in _modules()
        if p.relative_to(PACKAGE).parts[0] in SANS_IO
        or str(p.relative_to(PACKAGE)) in SANS_IO_MODULES
    ],
    ids=lambda p: str(p.relative_to(PACKAGE)),
)
def test_sans_io_packages_do_no_io(path: Path) -> None:
    bad = {
        m
        for m in _imports(path)
        if any(m == f or m.startswith(f + ".") for f in FORBIDDEN_IN_SANS_IO)
    }
    assert not bad, f"{path.name} imports {sorted(bad)}"


def test_every_sub_package_states_its_rule() -> None:
    for init in PACKAGE.glob("*/__init__.py"):
        assert ast.get_docstring(ast.parse(init.read_text())), init


def test_public_api_is_importable_and_documented() -> None:
    import pglogrepl_bridge

    for name in pglogrepl_bridge.__all__:
        value = getattr(pglogrepl_bridge, name)
        if name != "__version__" and isinstance(value, type):
            assert value.__doc__ and value.__module__.startswith("pglogrepl_bridge"), name


def test_every_public_class_and_function_has_a_docstring() -> None:
    """Public means not underscored, at module level or in a public class (h11 and psycopg
    document every public class; ``help()`` is the first thing a user reads)."""
    missing = []
    for path in _modules():
        tree = ast.parse(path.read_text())
        stack: list[tuple[ast.AST, str]] = [(tree, "")]
        while stack:
            node, prefix = stack.pop()
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                    if child.name.startswith("_"):
                        continue
                    if ast.get_docstring(child) is None:
                        missing.append(f"{path.relative_to(PACKAGE)}:{prefix}{child.name}")
                    if isinstance(child, ast.ClassDef):
                        stack.append((child, f"{prefix}{child.name}."))
    assert not missing, missing
