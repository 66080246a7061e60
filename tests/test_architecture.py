"""The house's layout (docs/architecture.md): no import circle, and no room imports from a room above or beside it.

Imports are read from the source with `ast`, those inside functions included: a lazy import is still a dependency
a reader has to follow.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).parent.parent
PACKAGE = ROOT / "llmkit"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: the llmkit modules it imports}, every import statement counted."""
    paths = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
            else:
                continue
            for target in targets:
                while target and target not in paths:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    found.add(target)
        graph[name] = found
    return graph


def room(module: str) -> str:
    """A top-level module or subpackage: llmkit.train.tasks.sft -> train; llmkit -> llmkit."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def layer_table() -> dict[str, int]:
    """{room: layer} from the table in docs/architecture.md."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    layers: dict[str, int] = {}
    for line in text.splitlines():
        match = re.match(r"\|\s*(\d+)\s*\|([^|]*)\|", line)
        if match:
            for name in re.findall(r"`([\w.]+)`", match.group(2)):
                layers[name] = int(match.group(1))
    return layers


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_layer_table_names_every_room() -> None:
    layers = layer_table()
    rooms = {room(module) for module in import_graph()}
    assert rooms == set(layers), (rooms - set(layers), set(layers) - rooms)


def test_no_import_circle() -> None:
    assert circles(import_graph()) == []


def test_no_room_imports_from_above_or_beside_it() -> None:
    layers = layer_table()
    wrong = []
    for module, imported in sorted(import_graph().items()):
        for target in sorted(imported):
            if room(target) == room(module):
                continue
            if layers[room(target)] >= layers[room(module)]:
                wrong.append(f"{module} (layer {layers[room(module)]}) imports {target} (layer {layers[room(target)]})")
    assert wrong == []


def test_the_checks_see_a_circle_and_an_upward_import() -> None:
    """The two checks on a graph that breaks both rules, so a green run means the package keeps them."""
    graph = {"llmkit.models": {"llmkit.compress.lowrank"}, "llmkit.compress.lowrank": {"llmkit.models"}}
    assert circles(graph) == [["llmkit.compress.lowrank", "llmkit.models"]]
    assert layer_table()["models"] < layer_table()["compress"]  # so models -> compress is upward
    assert "llmkit.plan" in import_graph()["llmkit.cli.tools"]  # function-local imports are read too
