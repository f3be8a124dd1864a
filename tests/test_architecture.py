"""The shape of the package: floors that import only down, no import cycles, small modules, types that check.

The floors are import-linter contracts in ``pyproject.toml`` (README "Architecture"); imports inside
functions count everywhere here, so a cycle cannot hide in a function body.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import grimp
import pytest
from _support import REPO

PACKAGE = REPO / "jasper_ray"
MAX_MODULE_LINES = 400
# What a function may import lazily: the heavy optional parts, and our modules that need them.
LAZY_MARK = "# lazy:"
LINT_IMPORTS = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_the_floors_hold() -> None:
    """``lint-imports`` keeps every contract of pyproject.toml (layers, and no Ray under the front-ends)."""
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "broken" in run.stdout and ", 0 broken" in run.stdout, run.stdout[-2000:]


def test_no_import_cycles() -> None:
    """No module reaches itself through the package's imports (those inside functions included)."""
    graph = grimp.build_graph("jasper_ray")
    modules = sorted(graph.modules)
    index = {m: i for i, m in enumerate(modules)}
    edges = {m: sorted(graph.find_modules_directly_imported_by(m) & set(modules)) for m in modules}
    # Tarjan's strongly connected components, iteratively.
    order, low, on_stack, stack, cycles, counter = {}, {}, set(), [], [], [0]
    for root in modules:
        if root in order:
            continue
        work = [(root, iter(edges[root]))]
        order[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, it = work[-1]
            child = next(it, None)
            if child is not None:
                if child not in order:
                    order[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(edges[child])))
                elif child in on_stack:
                    low[node] = min(low[node], order[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == order[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in edges[node]:
                    cycles.append(sorted(component, key=index.get))
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(REPO)))
def test_module_is_small(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{path.relative_to(REPO)} has {lines} lines (at most {MAX_MODULE_LINES})"


def _lazy_imports_without_reason(path: Path) -> list[str]:
    source = path.read_text()
    lines = source.splitlines()
    missing = []
    for fn in ast.walk(ast.parse(source)):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        imports = [n for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))]
        import_lines = {i for n in imports for i in range(n.lineno, (n.end_lineno or n.lineno) + 1)}
        for node in imports:
            if LAZY_MARK in lines[node.lineno - 1]:
                continue
            above = node.lineno - 1  # 1-based line above the statement
            while above in import_lines:
                if LAZY_MARK in lines[above - 1]:
                    break
                above -= 1
            if above >= 1 and LAZY_MARK in lines[above - 1]:
                continue
            missing.append(f"{path.relative_to(REPO)}:{node.lineno} ({ast.unparse(node)})")
    return missing


def test_imports_inside_functions_say_why() -> None:
    """An import inside a function keeps a heavy optional import (Ray, torch, h5py, matplotlib, tqdm) off a
    path; it says so on its line or on the comment line above its group: ``# lazy: <reason>``."""
    missing = [m for path in _modules() for m in _lazy_imports_without_reason(path)]
    assert not missing, "imports inside functions without a '# lazy: <reason>' comment:\n" + "\n".join(missing)


def test_types_check() -> None:
    """mypy (configured in pyproject.toml) passes over the package, which ships ``py.typed``."""
    assert (PACKAGE / "py.typed").is_file()
    run = subprocess.run([sys.executable, "-m", "mypy"], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
