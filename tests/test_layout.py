"""The layout's rules, checked on the code itself: no import circles, rooms import each module
alone, and the serving side never pulls torch in."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

ROOMS = ("collector", "trainer", "service", "loadtests", "benchmarks")


def modules() -> dict[str, Path]:
    found = {}
    for room in ROOMS:
        for path in sorted((REPO / room).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def project_imports(path: Path, known: set[str]) -> set[str]:
    """Project modules that `path` imports anywhere, lazy imports inside functions included
    (a circle through a lazy import still ties the two modules together); `if TYPE_CHECKING:`
    blocks are left out: annotations only, never run."""
    tree = ast.parse(path.read_text())
    typing_only = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING"
                   for node in ast.walk(block)}
    imported = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module)
            imported |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in imported if name in known}


def test_no_module_imports_itself_through_a_circle():
    found = modules()
    graph = {name: project_imports(path, set(found)) - {name} for name, path in found.items()}
    circles = []
    for start in graph:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    circles.append(" -> ".join(path + [start]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
    assert not circles, "import circles:\n" + "\n".join(sorted(set(circles)))


@pytest.mark.parametrize("room", ["collector", "service", "loadtests"])
def test_every_module_of_a_light_room_imports_alone(room):
    """`python -c 'import X'` for each module, each in a fresh interpreter (the heavy rooms,
    trainer and benchmarks, import torch: their circles are covered by the test above)."""
    skip = {"service.service"}  # loads the served model at import, by design (MODEL_TAG)
    names = [name for name in modules() if name.split(".")[0] == room and name not in skip
             and not name.endswith("__main__")]  # those run their command when imported
    failed = {}
    for name in names:
        result = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=REPO,
                                capture_output=True, text=True, timeout=120, check=False)
        if result.returncode != 0:
            failed[name] = result.stderr.strip().splitlines()[-1:]
    assert not failed, failed


def test_the_serving_side_never_imports_torch():
    code = ("import sys, importlib\n"
            f"for name in {sorted(n for n in modules() if n.startswith('service.'))!r}:\n"
            "    if name != 'service.service':\n"
            "        importlib.import_module(name)\n"
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=120, check=True)
    assert result.stdout.strip() == "False"
