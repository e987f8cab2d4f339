"""The architecture holds: imports go one way, with no circle, and scripts stay light.

The layers and the modules kept out of scripts are contracts in pyproject.toml,
checked by import-linter; lazy imports and ``TYPE_CHECKING`` imports count.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

REPO = Path(__file__).resolve().parents[1]


def test_imports_follow_the_layers_and_scripts_import_nothing_of_the_notebook():
    code = ("import sys; from importlinter.cli import lint_imports; "
            "sys.exit(lint_imports(no_cache=True, no_logo=True))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=120)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_no_module_imports_itself_through_others():
    graph = grimp.build_graph("fedmagic", cache_dir=None)

    circles = [sorted(group) for group in _strongly_connected(graph) if len(group) > 1]

    assert circles == []


def test_a_participant_script_loads_no_notebook_module():
    code = ("import sys, fedmagic.cli, fedmagic.fed_avg, fedmagic.engine.participant\n"
            "print(' '.join(sorted(sys.modules)))")
    modules = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 timeout=120, check=True).stdout.split())

    assert not {"IPython", "ipywidgets", "bqplot", "jupyter_client", "fedmagic.notebook"} \
        & modules


def _strongly_connected(graph: grimp.ImportGraph) -> list[set[str]]:
    """Tarjan's algorithm over the package's own modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            group = set()
            while True:
                member = stack.pop()
                group.add(member)
                if member == module:
                    break
            groups.append(group)

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return groups
