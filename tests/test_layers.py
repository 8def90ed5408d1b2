"""The package's layers point one way: every import, at the top of a module or inside a function,
goes to the same layer or a lower one, and no chain of imports comes back to where it started.

The order is written once, here. A module belongs to the first entry that names it or its
package; `from package import name` counts as importing the module `package.name` when there is
one. Python also runs a package's `__init__` before any of its modules, which is not counted:
`tasks/__init__.py` may list the tasks it offers.
"""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "dalle_jax"

# Lowest first. A module may import modules of its own layer and of the layers before it.
LAYERS = (
    ("dalle_jax", "dalle_jax.cli", "dalle_jax.sharding", "dalle_jax.text"),
    ("dalle_jax.data",),
    ("dalle_jax.config_lib",),
    ("dalle_jax.workdir",),
    ("dalle_jax.models",),
    ("dalle_jax.tasks",),
    ("dalle_jax.training",),
    ("dalle_jax.sampling",),
    ("dalle_jax.evaluation", "dalle_jax.serving", "dalle_jax.convert"),
    ("dalle_jax.pipeline", "dalle_jax.plan", "dalle_jax.evaluate", "dalle_jax.serve"),
    ("train", "sample"),
)


def module_files() -> dict[str, str]:
    """{module name: path} of the package and the entry scripts."""
    files = {"train": os.path.join(ROOT, "train.py"), "sample": os.path.join(ROOT, "sample.py")}
    for directory, _, names in os.walk(os.path.join(ROOT, PACKAGE)):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                files[module.removesuffix(".__init__")] = path
    return files


def imports_of(module: str, path: str, known) -> set[str]:
    """The project modules `module` imports anywhere in its file, functions included."""
    found = set()
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {name for name in found if name in known and name != module}


def layer_of(module: str) -> int:
    matches = [(len(entry), index) for index, entries in enumerate(LAYERS) for entry in entries
               if module == entry or module.startswith(entry + ".")]
    if not matches:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in {__file__}")
    return max(matches)[1]  # the most specific entry


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {module: imports_of(module, path, files) for module, path in files.items()}


def upward_imports(graph) -> list[str]:
    return sorted(f"{module} (layer {layer_of(module)}) imports {target} (layer "
                  f"{layer_of(target)})" for module, targets in graph.items()
                  for target in targets if layer_of(target) > layer_of(module))


def cycles(graph) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_every_module_has_a_layer():
    for module in module_files():
        layer_of(module)


def test_no_import_points_up_a_layer():
    assert upward_imports(import_graph()) == []


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_the_checks_see_imports_inside_functions(tmp_path):
    """The checks themselves: a function-level import up a layer and a cycle are both found."""
    graph = {"dalle_jax.models.dvae": {"dalle_jax.training.loop"},
             "dalle_jax.training.loop": {"dalle_jax.models.dvae"}}
    assert upward_imports(graph) == ["dalle_jax.models.dvae (layer 4) imports "
                                     "dalle_jax.training.loop (layer 6)"]
    assert cycles(graph) == [["dalle_jax.models.dvae", "dalle_jax.training.loop"]]
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from dalle_jax.training import loop\n"
                      "    from . import chunks\n")
    known = {"dalle_jax.training", "dalle_jax.training.loop", "dalle_jax.models.chunks"}
    assert imports_of("dalle_jax.models.m", str(source), known) == {
        "dalle_jax.training.loop", "dalle_jax.models.chunks"}


def test_training_knows_no_task_by_name():
    """The loop trains whatever Task it is given: no task module, no task name in training/."""
    graph = import_graph()
    for module, targets in graph.items():
        if module.startswith("dalle_jax.training"):
            assert {t for t in targets if t.startswith("dalle_jax.tasks")} <= {
                "dalle_jax.tasks.task"}, module
            source = open(module_files()[module]).read()
            for name in ("dvae", "dalle", "clip"):
                assert f'"{name}"' not in source and f"'{name}'" not in source, (module, name)
