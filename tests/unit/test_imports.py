"""The package's import structure, read from the source (AST), imports inside functions included:
no import cycles anywhere in lmforge/, and every import goes down the layer order below. The rule
docs/internals.md states for imports inside functions: an optional extra (a package pyproject.toml
does not list as a core dependency) is imported only when it is used, inside a function, so that
importing any lmforge module works without it."""

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

import lmforge

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the dev extra's tomli
    import tomli as tomllib

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


# --- Optional extras are imported only inside functions -------------------------------------------
# A module whose whole job is one extra: the modules that use it import it inside a function.
EXTRA_MODULES = {"lmforge.infer.lm_eval_model": {"lm_eval"}}
PYPROJECT = ROOT.parent / "pyproject.toml"


def _normal(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


CORE = {
    _normal(re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0])
    for req in tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]["dependencies"]
}
DISTRIBUTIONS = packages_distributions()


def is_optional(top: str) -> bool:
    """A third-party top-level package that no core dependency provides (not installed: optional,
    since every core dependency is)."""
    if top in sys.stdlib_module_names or top in ("lmforge", "__future__"):
        return False
    return not any(_normal(d) in CORE for d in DISTRIBUTIONS.get(top, ()))


def import_time(module: str) -> tuple[set[str], set[str]]:
    """(lmforge modules, other top-level packages) that importing `module` runs imports of: its
    body outside function bodies (class bodies, if and try blocks run), a module's packages too.
    An import in a `try` whose handler catches ImportError is optional by design and left out."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    own, other = set(), set()

    def visit(nodes, guarded=False):
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if isinstance(node, ast.Try):
                catches = any("ImportError" in ast.unparse(h.type or ast.Name("")) for h in node.handlers)
                visit(node.body, guarded or catches)
                for block in (node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                    visit(block, guarded)
            elif isinstance(node, (ast.If, ast.With, ast.ClassDef, ast.For, ast.While)):
                visit(node.body, guarded)
                visit(getattr(node, "orelse", []), guarded)
            elif isinstance(node, (ast.Import, ast.ImportFrom)) and not guarded:
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                else:
                    base = node.module or ""
                    if node.level:
                        anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                        base = ".".join(anchor + ([base] if base else []))
                    names = [base] + [f"{base}.{alias.name}" for alias in node.names]
                for name in names:
                    if name == "lmforge" or name.startswith("lmforge."):
                        target = _resolve(name)
                        while target:  # a module's packages are imported before it
                            own.add(target)
                            target = target.rpartition(".")[0]
                    else:
                        other.add(name.split(".")[0])

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)).body)
    parent = module.rpartition(".")[0]
    while parent:
        own.add(parent)
        parent = parent.rpartition(".")[0]
    own.discard(module)
    return own, other


IMPORT_TIME = {m: import_time(m) for m in MODULES}


def extras_at_import(module: str) -> dict[str, str]:
    """{optional package: the lmforge module that imports it at import time} for `import module`."""
    found, seen, todo = {}, set(), [module]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        own, other = IMPORT_TIME[m]
        found.update({top: m for top in other if is_optional(top)})
        todo.extend(own)
    return found


def test_the_extras_check_knows_core_from_optional():
    assert not is_optional("torch") and not is_optional("yaml") and not is_optional("json")
    assert is_optional("gguf") and is_optional("lm_eval") and is_optional("no_such_package_xyz")
    assert {"lmforge.infer", "lmforge"} <= IMPORT_TIME["lmforge.infer.lm_eval_model"][0]
    assert "lm_eval" in extras_at_import("lmforge.infer.lm_eval_model")


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m not in EXTRA_MODULES))
def test_optional_extras_are_imported_inside_functions(module):
    found = extras_at_import(module)
    assert found == {}, (
        f"importing {module} imports optional packages at import time: {found}; "
        "import them inside the function that uses them (docs/internals.md)"
    )
