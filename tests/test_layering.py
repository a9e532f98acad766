"""The package's layering, read from its imports: no module imports from a layer above it.

Data flows one way (docs/architecture.md): integrations -> distiller (contract, schedule, teacher)
-> loss -> sources / relation_loss -> kernels (scores and objectives). ``functional`` is the
checked public face of the kernels and lies on no step's path. A cycle between two modules, or a
kernel importing ``functional`` or the dispatcher, means a lower layer reaches up.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "crcd_plugin"


def _imports() -> dict:
    """``{module: modules of crcd_plugin it imports}``, function-level imports included."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                targets = [target, *(f"{target}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def _reaches(graph: dict, start: str, goal: str) -> bool:
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node == goal:
            return True
        if node not in seen:
            seen.add(node)
            todo.extend(graph.get(node, ()))
    return False


def test_no_module_of_the_package_imports_itself_back():
    graph = _imports()
    cycles = [(a, b) for a in graph for b in graph[a] if _reaches(graph, b, a)]
    assert not cycles, cycles


def test_the_kernels_import_nothing_from_the_objectives_or_the_dispatcher_above_them():
    graph = _imports()
    kernels = [name for name in graph if name.startswith("crcd_plugin.kernels")]
    above = {"crcd_plugin.functional", "crcd_plugin.relation_loss", "crcd_plugin.loss", "crcd_plugin"}
    assert kernels and not {(k, t) for k in kernels for t in graph[k] if t in above}


def test_only_the_package_root_and_the_integrations_reach_the_distiller():
    graph = _imports()
    users = {name for name, targets in graph.items() if "crcd_plugin.distiller" in targets}
    allowed = {"crcd_plugin"} | {n for n in graph if n.startswith(("crcd_plugin.integrations", "crcd_plugin.demo"))}
    assert users <= allowed, users - allowed


def test_the_loss_path_runs_the_kernels_not_the_checked_public_functions():
    graph = _imports()
    path = ["crcd_plugin.loss", "crcd_plugin.relation_loss", "crcd_plugin.negatives"]
    assert not {name for name in path if "crcd_plugin.functional" in graph[name]}
    assert "crcd_plugin.kernels.objectives" in graph["crcd_plugin.relation_loss"]
