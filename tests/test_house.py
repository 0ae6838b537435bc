"""The shape of the package, checked: its import layers and its size budgets.

Layers, from the bottom (DESIGN.md, "The shape"): the base modules (configuration,
errors, service slots, metrics, the loop bridge); storage and events, which
never import each other, the states or the runners; the service locator over
them; the states; the runners; the command line, integrations and testing on
top. Nothing imports another package's private module. Every import counts,
also one inside a function.

Budgets: no module over 500 lines, no class over 300 lines of code and no
function over 60 (docstrings, comments and blank lines aside). An exception is
listed below by name, with its reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import recoverable_state

PACKAGE = Path(recoverable_state.__file__).parent

BASE = {"_config", "_errors", "_services", "_metrics", "_concurrency", "_bridge", "_forks", "py"}
"""The bottom layer: modules of the package root that import nothing of the library above them."""

# What each part may import from the library, besides itself and the base layer.
ALLOWED: dict[str, set[str]] = {
    "base": set(),
    "storage": set(),
    "events": set(),
    "_locator": {"storage", "events"},
    "state": {"storage", "events"},
    "runners": {"storage", "events", "state", "_locator"},
    "testing": {"storage"},
    "cli": {"storage", "events", "state", "_locator", "runners", "__init__"},
    "integrations": {"storage", "events", "state", "_locator", "runners", "__init__"},
    "__init__": {"storage", "events", "state", "_locator", "runners"},
}

MODULE_LINES = 500
CLASS_LINES = 300
FUNCTION_LINES = 60

EXCEPTIONS: dict[str, str] = {}
"""Places allowed past a budget (`path` or `path:name`), each with the reason it is clearer so."""


def part_of(module: str) -> str:
    """The part a module (dotted, below the package) belongs to."""
    head = module.split(".")[0]
    if head in BASE:
        return "base"
    return head


def library_imports(path: Path) -> list[tuple[str, int]]:
    """Every module of the library `path` imports (dotted, below the package), with its line."""
    relative = path.relative_to(PACKAGE).with_suffix("")
    here = list(relative.parts[:-1])  # the package a relative import starts from
    found: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1] if node.level > 1 else here
                target = [*base, *(node.module.split(".") if node.module else [])]
                if not node.module:  # `from . import x`: a name is a module, or a name of the package
                    for alias in node.names:
                        place = PACKAGE.joinpath(*target, alias.name)
                        module = (
                            [*target, alias.name]
                            if place.is_dir() or place.with_suffix(".py").exists()
                            else target
                        )
                        found.append((".".join(module) or "__init__", node.lineno))
                    continue
                found.append((".".join(target) or "__init__", node.lineno))
            elif node.module and node.module.split(".")[0] == "recoverable_state":
                found.append((".".join(node.module.split(".")[1:]) or "__init__", node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "recoverable_state":
                    found.append((".".join(alias.name.split(".")[1:]) or "__init__", node.lineno))
    return found


def sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def test_each_part_imports_only_the_layers_below_it() -> None:
    wrong: list[str] = []
    for path in sources():
        mine = part_of(module_name(path))
        for target, line in library_imports(path):
            theirs = part_of(target)
            if theirs in ("base", mine) or theirs in ALLOWED[mine]:
                continue
            wrong.append(f"{path.relative_to(PACKAGE)}:{line}: {mine} imports {target}")
    assert wrong == []


def test_nothing_imports_another_packages_private_module() -> None:
    wrong: list[str] = []
    for path in sources():
        mine = part_of(module_name(path))
        for target, line in library_imports(path):
            parts = target.split(".")
            theirs = part_of(target)
            private = any(p.startswith("_") for p in parts[1:])
            if theirs not in ("base", mine) and private:
                wrong.append(f"{path.relative_to(PACKAGE)}:{line}: imports {target}")
    assert wrong == []


def test_the_base_layer_imports_only_itself() -> None:
    for path in sources():
        if part_of(module_name(path)) != "base":
            continue
        assert {part_of(t) for t, _ in library_imports(path)} <= {"base"}, path


def _code_lines(lines: list[str], node: ast.AST) -> int:
    """Lines of code of a class or function: not its docstrings, comments or blank lines."""
    skip: set[int] = set()
    for sub in ast.walk(node):
        body = getattr(sub, "body", None)
        if not isinstance(sub, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) or not body:
            continue
        strings = [s for s in body if isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)]
        for doc in strings if isinstance(sub, ast.ClassDef) else strings[:1]:  # attribute docstrings too
            if isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str):
                skip.update(range(doc.lineno, (doc.end_lineno or doc.lineno) + 1))
    start, end = node.lineno, node.end_lineno or node.lineno  # type: ignore[attr-defined]
    return sum(
        1
        for n in range(start, end + 1)
        if n not in skip and lines[n - 1].strip() and not lines[n - 1].strip().startswith("#")
    )


def over_budget() -> list[str]:
    found: list[str] = []
    for path in sources():
        name = str(path.relative_to(PACKAGE))
        text = path.read_text()
        lines = text.splitlines()
        if len(lines) > MODULE_LINES and name not in EXCEPTIONS:
            found.append(f"{name}: {len(lines)} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                limit = CLASS_LINES if isinstance(node, ast.ClassDef) else FUNCTION_LINES
                size = _code_lines(lines, node)
                if size > limit and f"{name}:{node.name}" not in EXCEPTIONS:
                    found.append(f"{name}:{node.name}: {size} lines of code")
    return found


def test_modules_classes_and_functions_stay_within_their_budgets() -> None:
    assert over_budget() == []


@pytest.mark.parametrize("place", sorted(EXCEPTIONS) or ["(none)"])
def test_every_listed_exception_is_still_needed(place: str) -> None:
    if place == "(none)":
        return
    path, _, name = place.partition(":")
    saved = EXCEPTIONS.pop(place)
    try:
        assert any(
            found.startswith(place if name else f"{path}:") or found.startswith(f"{path}:")
            for found in over_budget()
        )
    finally:
        EXCEPTIONS[place] = saved
