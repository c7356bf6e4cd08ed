"""The package's import graph: no circle, imports point down, the training core knows no sweep.

Read with ``ast`` from the source files, so the test sees every import, also those
inside functions, without importing anything.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dps_tune"
SUBPACKAGES = ("data", "sweep", "demo", "bench")
# What a trial needs to run; none of it may reach the sweep, the demo or Ray.
CORE = ("config", "objectives", "models", "methods", "suppression", "optim", "train", "evaluate", "checkpoint",
        "metrics", "errors", "paths", "files", "layout", "data")
FORBIDDEN_FOR_CORE = ("dps_tune.sweep", "dps_tune.demo", "dps_tune.cli", "dps_tune.preflight", "ray", "optuna")
# The report package, in import order: a module imports only those before it; the package
# __init__ gathers their names, and the rest of dps_tune imports the package, not its modules.
REPORT = "dps_tune.sweep.report"
REPORT_LAYERS = ("style", "loading", "figures", "tables", "page")
# What the cached-image path runs in a trial: it shares sampling, records and the cache
# format with the JPEG loaders and `prepare`, but loads neither of them.
CACHE_PATH = ("dps_tune.data.cache_reader", "dps_tune.data.augment")
NOT_ON_CACHE_PATH = ("dps_tune.data.datasets", "dps_tune.data.cache_writer")
# The command line, in layers: a module imports only the CLI modules of the layers before
# its own; the package __init__ (the parser and main) gathers the commands, and outside the
# package only the reference page reads it, through the package.
CLI = "dps_tune.cli"
CLI_LAYERS = (("base",), ("training", "reading", "ensembling", "dashboard"), ("sweeping",))
CLI_READERS = ("dps_tune.reference_doc",)
# Imports written as strings, which the walker cannot see: models.TAG_PROVIDERS names
# "module:function" hooks that the model layer imports the first time a pretrained tag is
# looked up, so that it never imports the demo that builds those weights. The core may
# import by string only there, and only these providers.
STRING_IMPORTS = {"dps_tune.models": "TAG_PROVIDERS"}
TAG_PROVIDERS = {("dps_tune.demo.pretrain", "register_tags")}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path, here: str | None = None) -> set[str]:
    """Every module ``path`` imports, absolute, at any depth of the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = here or module_name(path)
    package = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            # `from dps_tune import models` imports the module dps_tune.models
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}


def unit(module: str) -> str:
    """A flat core module is its own unit; a subpackage is one unit."""
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in SUBPACKAGES:
        return ".".join(parts[:2])
    return module


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_walker_sees_imports_inside_functions_and_relative_ones(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import os\ndef f():\n    from dps_tune.sweep import results\n")
    assert {"dps_tune.sweep", "dps_tune.sweep.results", "os"} <= imports_of(src, "dps_tune.m")
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle_between_modules():
    assert find_cycle(graph()) is None


def test_no_import_circle_between_units():
    """Subpackages count as one unit each: data, sweep and demo import each other in one direction only."""
    edges: dict[str, set[str]] = {}
    for src, targets in graph().items():
        edges.setdefault(unit(src), set()).update(unit(t) for t in targets if unit(t) != unit(src))
    assert find_cycle(edges) is None


def test_training_core_imports_no_sweep_demo_or_ray():
    g = graph()
    core = [m for m in g if m.count(".") and unit(m).split(".")[1] in CORE]
    assert "dps_tune.train" in core and "dps_tune.data.inputs" in core
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    for module in core:
        for imported in imports_of(modules[module]):
            assert not imported.startswith(FORBIDDEN_FOR_CORE), f"{module} imports {imported}"


def string_imports(path: Path, name: str) -> set[tuple[str, str]]:
    """The ``module:function`` specs of the list ``name`` assigned at the top of ``path``."""
    for node in ast.parse(path.read_text()).body:
        target = node.target if isinstance(node, ast.AnnAssign) else (
            node.targets[0] if isinstance(node, ast.Assign) else None)
        if isinstance(target, ast.Name) and target.id == name:
            return {tuple(spec.split(":")) for spec in ast.literal_eval(node.value)}
    raise AssertionError(f"{path} assigns no {name}")


def imports_by_string(path: Path) -> bool:
    """Whether ``path`` calls ``importlib.import_module`` or ``__import__`` anywhere."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            f = node.func
            if (isinstance(f, ast.Attribute) and f.attr == "import_module") or (
                    isinstance(f, ast.Name) and f.id in ("import_module", "__import__")):
                return True
    return False


def test_the_core_imports_by_string_only_the_declared_tag_providers_and_they_exist():
    """The demo's ``synthetic`` tags reach the model layer through a string: each spec names a function
    of the package above the core, and no other core module imports anything by name."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    core = {m for m in modules if m.count(".") and unit(m).split(".")[1] in CORE}
    assert {m for m in core if imports_by_string(modules[m])} == set(STRING_IMPORTS)
    specs = set().union(*(string_imports(modules[m], name) for m, name in STRING_IMPORTS.items()))
    assert specs == TAG_PROVIDERS, f"undeclared or lost tag providers: {sorted(specs ^ TAG_PROVIDERS)}"
    for module, function in specs:
        assert module in modules and module not in core, f"tag provider {module} is not a package module above the core"
        defined = {n.name for n in ast.parse(modules[module].read_text()).body if isinstance(n, ast.FunctionDef)}
        assert function in defined, f"{module} defines no {function}"


def test_only_the_ray_tune_package_imports_ray():
    users = sorted(module_name(p) for p in PACKAGE.rglob("*.py")
                   if any(m == "ray" or m.startswith("ray.") for m in imports_of(p)))
    assert users and all(m.startswith("dps_tune.sweep.ray_tune.") for m in users), users
    # Its __init__ sets Ray's environment defaults before any of its modules imports Ray.
    init = PACKAGE / "sweep" / "ray_tune" / "__init__.py"
    assert not any(m == "ray" or m.startswith("ray.") for m in imports_of(init))
    lines = init.read_text().splitlines()
    first_import = next(i for i, line in enumerate(lines) if line.startswith("from dps_tune.sweep.ray_tune."))
    assert all(i < first_import for i, line in enumerate(lines) if line.startswith("os.environ.setdefault("))


def reachable(edges: dict[str, set[str]], start: str) -> set[str]:
    """Every module ``start`` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for nxt in edges.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_cache_reader_and_the_augmentation_load_neither_the_dataset_sources_nor_the_writer():
    g = graph()
    for module in CACHE_PATH:
        assert module in g, module
        loaded = reachable(g, module)
        assert "dps_tune.data.sampling" in loaded, module  # the order and crops the JPEG path draws too
        for other in NOT_ON_CACHE_PATH:
            assert other not in loaded, f"{module} imports {other}"


def test_the_report_package_imports_point_down_its_layers():
    g = graph()
    layers = [f"{REPORT}.{name}" for name in REPORT_LAYERS]
    assert sorted(m for m in g if m.startswith(REPORT + ".")) == sorted(layers)
    assert set(layers) <= g[REPORT]
    for i, module in enumerate(layers):
        inside = {m for m in g[module] if m == REPORT or m.startswith(REPORT + ".")}
        assert inside <= set(layers[:i]), f"{module} imports {sorted(inside - set(layers[:i]))}"
    for module, targets in g.items():
        if not module.startswith(REPORT):
            assert not {t for t in targets if t.startswith(REPORT + ".")}, f"{module} reaches into {REPORT}"


def test_the_cli_package_imports_point_down_its_layers():
    g = graph()
    modules = [f"{CLI}.{name}" for layer in CLI_LAYERS for name in layer]
    assert sorted(m for m in g if m.startswith(CLI + ".")) == sorted(modules + [f"{CLI}.__main__"])
    assert set(modules) - {f"{CLI}.base"} <= g[CLI]
    below: set[str] = set()
    for layer in CLI_LAYERS:
        for module in (f"{CLI}.{name}" for name in layer):
            inside = {m for m in g[module] if m == CLI or m.startswith(CLI + ".")}
            assert inside <= below, f"{module} imports {sorted(inside - below)}"
        below |= {f"{CLI}.{name}" for name in layer}
    assert {m for m in g[f"{CLI}.__main__"] if m.startswith(CLI)} == {CLI}
    for module, targets in g.items():
        if module != CLI and not module.startswith(CLI + "."):
            reached = {t for t in targets if t == CLI or t.startswith(CLI + ".")}
            assert not reached or (module in CLI_READERS and reached == {CLI}), f"{module} imports {sorted(reached)}"


def test_every_data_file_of_the_package_ships_in_the_wheel():
    """Files the code reads beside its modules (configs, spaces, the report's page) are package data."""
    import tomllib

    setuptools = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]
    shipped = {p for pattern in setuptools["package-data"]["dps_tune"] for p in PACKAGE.glob(pattern)}
    data = [p for p in PACKAGE.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc")]
    assert PACKAGE / "sweep" / "report" / "page.html" in data
    for path in data:
        assert path in shipped, f"{path.relative_to(PACKAGE)} is not in pyproject's package-data"
