"""Imports go one way, down the layers of README's "How the code is laid out": no circle, no import
from a lower layer to a higher one, and no import of the project's own modules delayed into a
function body (the one exception: the DALI loader, imported only when chosen, as DALI may be absent)."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

# Layer of each module (by longest matching prefix); a module imports only its own layer or lower ones.
LAYERS = {
    "imagenet_resnet": 0, "imagenet_resnet.errors": 0, "imagenet_resnet.files": 0, "imagenet_resnet.layout": 0,
    "imagenet_resnet.models": 0, "imagenet_resnet.config": 0, "imagenet_resnet.cli": 0,
    "imagenet_resnet.unpickle": 0,
    "imagenet_resnet.optim": 1, "imagenet_resnet.distributed": 1, "imagenet_resnet.checkpoint": 1,
    "imagenet_resnet.lease": 1, "imagenet_resnet.metrics": 1, "imagenet_resnet.stragglers": 1,
    "imagenet_resnet.guards": 1,
    "imagenet_resnet.data": 2,
    "imagenet_resnet.network": 3, "imagenet_resnet.published": 3, "imagenet_resnet.finetune": 3,
    "imagenet_resnet.resume": 3, "imagenet_resnet.evaluation": 3, "imagenet_resnet.inference": 3,
    "imagenet_resnet.trainer": 4,
    "imagenet_resnet.train": 5, "imagenet_resnet.evaluate": 5, "imagenet_resnet.predict": 5,
    "imagenet_resnet.export": 5, "imagenet_resnet.plot": 5,
    "data_prep": 6,
    "benchmarks": 7,
}
# DALI is optional (absent on some machines): imported where it is used.
DELAYED_ALLOWED = {("imagenet_resnet.data", "imagenet_resnet.data.dali_loader"),
                   ("benchmarks.steploop", "imagenet_resnet.data.dali_loader")}


def modules() -> dict[str, Path]:
    found = {}
    for package in ("imagenet_resnet", "data_prep", "benchmarks"):
        for path in (REPO / package).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            found[name] = path
    return found


def layer(module: str) -> int:
    prefixes = [p for p in LAYERS if module == p or module.startswith(p + ".")]
    return LAYERS[max(prefixes, key=len)]


def imports(path: Path, known: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(modules of the project imported at the top level, those imported inside a function)."""
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    eager, delayed = set(), set()
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                (eager if id(node) in top_level else delayed).add(name)
    return eager, delayed


def test_imports_go_down_the_layers_without_circles_or_delayed_imports():
    known = modules()
    graph, upward, delayed = {}, [], []
    for name, path in known.items():
        eager, late = imports(path, known)
        graph[name] = eager - {name}
        upward += [f"{name} (layer {layer(name)}) -> {dep} (layer {layer(dep)})" for dep in graph[name]
                   if layer(dep) > layer(name)]
        delayed += [f"{name} -> {dep}" for dep in late if (name, dep) not in DELAYED_ALLOWED]
    assert not upward, upward
    assert not delayed, delayed
    done: set[str] = set()

    def visit(name: str, stack: list[str]) -> None:
        assert name not in stack, f"import circle: {' -> '.join(stack[stack.index(name):] + [name])}"
        if name not in done:
            for dep in graph[name]:
                visit(dep, stack + [name])
            done.add(name)

    for name in graph:
        visit(name, [])


def test_the_layer_table_knows_every_module():
    assert all(any(m == p or m.startswith(p + ".") for p in LAYERS) for m in modules())
