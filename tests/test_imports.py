"""The package's import structure, read from the source (AST), imports inside functions included:
no import cycles anywhere in lmforge/, and every import goes down the layer order below."""

import ast
from pathlib import Path

import pytest

import lmforge

ROOT = Path(lmforge.__file__).parent

# Low to high. A module may import its own package and the packages of lower layers only.
LAYERS = [
    {"errors", "loss", "hardware"},
    {"model"},  # the model: may import lmforge.errors and lmforge.model.* alone
    {"config", "mindformers"},  # run configs (MindFormers' YAML is translated into ours)
    {"weights"},  # on-disk formats, dtypes, output folders: below every stage that writes files
    {"tokenizer", "data"},
    {"parallel"},
    {"interop"},
    {"infer"},
    {"train"},
]
APP_LAYER = len(LAYERS)  # cli, demo, __main__ and anything not listed: may import everything


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _resolve(name: str) -> str | None:
    """The lmforge module an imported dotted name lands in (a name inside a module -> the module)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> set[str]:
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name == "lmforge" or name.startswith("lmforge."):
                target = _resolve(name)
                if target and target != module:
                    found.add(target)
    return found


GRAPH = {m: imports_of(m) for m in MODULES}


def layer_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    return next((i for i, group in enumerate(LAYERS) if top in group), APP_LAYER)


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_walk_sees_the_package():
    assert {"lmforge.train.trainer", "lmforge.weights.checkpoint", "lmforge.model.transformer"} <= set(GRAPH)
    assert "lmforge.weights.checkpoint" in GRAPH["lmforge.train.checkpointer"]
    assert "lmforge.interop.loading" in GRAPH["lmforge.train.trainer"]
    # imports inside functions count: the CLI imports each command's stage when it runs
    assert "lmforge.infer.lm_eval_tasks" in GRAPH["lmforge.cli"]


def test_the_checks_catch_what_they_are_for():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []
    assert layer_of("lmforge.interop.loading") < layer_of("lmforge.train.trainer")
    assert layer_of("lmforge.cli") == APP_LAYER


def test_no_import_cycles():
    cycles = find_cycles(GRAPH)
    assert cycles == [], f"import cycles (imports inside functions included): {cycles}"


def test_train_is_imported_by_nothing_below_it():
    bad = [
        f"{m} -> {t}"
        for m, targets in GRAPH.items()
        for t in targets
        if t.startswith("lmforge.train")
        and m.split(".")[1] in {"infer", "interop", "weights", "model", "data"}
    ]
    assert bad == []


def test_model_imports_only_errors_and_itself():
    bad = [
        f"{m} -> {t}"
        for m, targets in GRAPH.items()
        if m.startswith("lmforge.model")
        for t in targets
        if not (t == "lmforge.errors" or t == "lmforge.model" or t.startswith("lmforge.model."))
    ]
    assert bad == []


@pytest.mark.parametrize("module", sorted(m for m in MODULES if "." in m))
def test_imports_go_down_the_layers(module):
    mine = layer_of(module)
    up = sorted(t for t in GRAPH[module] if layer_of(t) > mine)
    assert up == [], f"{module} (layer {mine}) imports from a higher layer: {up}"
