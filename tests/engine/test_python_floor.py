"""The Python floor (``requires-python = ">=3.9"``), checked statically: only 3.11 runs here.

QGIS 3.22-3.28 on Windows ship Python 3.9, and the plugin's QGIS side runs in it. Two things
break there that 3.11 does not notice:

- syntax of a later Python (``match``, ``except*``): every module must parse with
  ``feature_version=(3, 9)`` (ruff's ``target-version = "py39"`` checks the same from its side);
- ``X | Y`` between types evaluated at run time (``PathLike = str | os.PathLike[str]``,
  ``isinstance(x, int | float)``): types gained ``|`` in 3.10. Annotations are exempt, because
  every module has ``from __future__ import annotations`` (checked too), which keeps them text.
"""

from __future__ import annotations

import ast
import builtins
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("kdmsi_engine", "kdmsi_qgis")
FLOOR = (3, 9)

#: Builtin names that are types (``str``, ``int``, ``dict``, ``ValueError``, ...).
_BUILTIN_TYPES = frozenset(
    name for name in dir(builtins) if isinstance(getattr(builtins, name), type)
)


def _sources() -> list[Path]:
    files = sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))
    assert len(files) > 50, files
    return files


def _is_type(node: ast.AST) -> bool:
    """Surely a type: a builtin type, ``None``, a subscripted generic (``os.PathLike[str]``,
    ``dict[str, Any]``) or a union of those."""
    if isinstance(node, ast.Name):
        return node.id in _BUILTIN_TYPES
    if isinstance(node, ast.Constant):
        return node.value is None
    if isinstance(node, ast.Subscript):
        return isinstance(node.value, (ast.Name, ast.Attribute))
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _is_type(node.left) or _is_type(node.right)
    return False


def _maybe_type(node: ast.AST) -> bool:
    """A type if the other operand is one: an attribute such as ``os.PathLike`` or a name."""
    return _is_type(node) or isinstance(node, (ast.Attribute, ast.Name))


def _is_type_union(node: ast.AST) -> bool:
    if not (isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr)):
        return False
    left, right = node.left, node.right
    return (_is_type(left) and _maybe_type(right)) or (_is_type(right) and _maybe_type(left))


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node evaluated at run time: all but annotations (text under the future import)."""
    annotations: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.returns:
            annotations.add(id(node.returns))
        elif isinstance(node, ast.arg) and node.annotation is not None:
            annotations.add(id(node.annotation))
        elif isinstance(node, ast.AnnAssign):
            annotations.add(id(node.annotation))
    stack = [tree]
    while stack:
        node = stack.pop()
        if id(node) in annotations:
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def _has_future_annotations(tree: ast.Module) -> bool:
    return any(
        isinstance(node, ast.ImportFrom)
        and node.module == "__future__"
        and any(alias.name == "annotations" for alias in node.names)
        for node in tree.body
    )


def _runtime_type_unions(source: str, name: str = "<test>") -> list[str]:
    """``line: expression`` of every run-time ``X | Y`` between types in ``source``."""
    tree = ast.parse(source, filename=name, feature_version=FLOOR)
    nodes = _runtime_nodes(tree) if _has_future_annotations(tree) else ast.walk(tree)
    found = [node for node in nodes if _is_type_union(node)]
    # Report each union once, not its inner ``X | Y`` again.
    inner = {id(n.left) for n in found if isinstance(n, ast.BinOp)}
    return [f"{n.lineno}: {ast.unparse(n)}" for n in found if id(n) not in inner]


@pytest.mark.parametrize(
    ("source", "lines"),
    [
        ("import os\nPathLike = str | os.PathLike[str]\n", [2]),
        ("x = isinstance(1, int | float)\n", [1]),
        ("A = gpd.GeoDataFrame | None\n", [1]),
        ("B = str | os.PathLike[str] | gpd.GeoDataFrame\n", [1]),  # reported once
        ("C = cast('x', dict[str, int] | None)\n", [1]),
        ("def f(x: str | None) -> int | None:\n    y: list[int] | None = None\n", []),
        ("y: int | None = None\n", []),
        ("flags = Qt.AlignLeft | Qt.AlignTop\nmask = a | (b > 1)\nd = d1 | d2\nn = 1 | 2\n", []),
    ],
)
def test_the_check_finds_run_time_unions(source: str, lines: list[int]) -> None:
    """The detector itself: run-time unions found, annotations and bit operations left alone."""
    found = _runtime_type_unions("from __future__ import annotations\n" + source)
    assert [int(item.split(":")[0]) - 1 for item in found] == lines, found


def test_annotations_count_without_the_future_import() -> None:
    """Without ``from __future__ import annotations``, 3.9 evaluates annotations too."""
    assert _runtime_type_unions("def f(x: str | None) -> None:\n    pass\n") == ["1: str | None"]


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_module_runs_on_the_python_floor(path: Path) -> None:
    source = path.read_text(encoding="utf-8")
    try:
        tree = ast.parse(source, filename=str(path), feature_version=FLOOR)
    except SyntaxError as exc:  # pragma: no cover - the failure message is the point
        pytest.fail(f"{path.name}:{exc.lineno}: not Python {FLOOR[0]}.{FLOOR[1]} syntax: {exc}")
    if tree.body:
        assert _has_future_annotations(tree), (
            f"{path.relative_to(ROOT)} lacks 'from __future__ import annotations' "
            "(3.9 would evaluate its annotations)"
        )
    unions = _runtime_type_unions(source, str(path))
    assert not unions, (
        f"{path.relative_to(ROOT)}: 'X | Y' between types runs only on Python 3.10+; use "
        f"typing.Union/Optional there: {unions}"
    )
