"""The house: no import circle among cnc_jax modules, no import from a lower floor to a higher one, no private
name taken from another module. Read from the source with `ast` (every import, at the top or inside a function),
so a new module, circle or upward import fails here before anyone runs it."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "cnc_jax"

# Floors, lowest first; a module may import its own floor (without a circle) and the floors below it.
FLOORS = (
    ("cnc_jax.torchfile",),
    ("cnc_jax.model_config", "cnc_jax.io", "cnc_jax.sharding", "cnc_jax.platform", "cnc_jax.validation",
     "cnc_jax.distributed", "cnc_jax.data_parallel", "cnc_jax.configs"),
    ("cnc_jax.models", "cnc_jax.diffusion", "cnc_jax.text_encoder"),
    ("cnc_jax.checkpoint",),
    ("cnc_jax.annotators",),
    ("cnc_jax.sampling", "cnc_jax.training", "cnc_jax.data"),
    ("cnc_jax.eval",),
    ("cnc_jax.prep",),
    ("cnc_jax.cli",),
)


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def floor_of(module: str) -> int:
    if module == "cnc_jax":  # the package itself: an empty face
        return 0
    for level, names in enumerate(FLOORS):
        if any(module == n or module.startswith(n + ".") for n in names):
            return level
    raise AssertionError(f"{module} is on no floor: add it to FLOORS in {__file__}")


def imports_of(module: str) -> list[tuple[str, str, int]]:
    """(imported cnc_jax module, imported name or '', line) of every import statement in `module`."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, "", node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.append((submodule, "", node.lineno) if submodule in MODULES
                             else (base, alias.name, node.lineno))
    return [(m, name, line) for m, name, line in found if m == "cnc_jax" or m.startswith("cnc_jax.")]


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for module in MODULES:
        targets = set()
        for target, _, _ in imports_of(module):
            while target not in MODULES and "." in target:  # `import cnc_jax.x.y` of a name, not a module
                target = target.rpartition(".")[0]
            if target != module:
                targets.add(target)
        graph[module] = targets
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def is_package_face(module: str, target: str) -> bool:
    """A package's __init__ handing on names of its own modules (and a module of it importing a sibling through
    the package path) is not a circle of files."""
    return MODULES[module].name == "__init__.py" and target.startswith(module + ".")


def test_every_module_is_on_a_floor():
    for module in MODULES:
        floor_of(module)


def test_no_import_circle():
    graph = {m: {t for t in targets if not is_package_face(m, t)} for m, targets in import_graph().items()}
    assert circles(graph) == []


def test_no_import_from_a_lower_floor_to_a_higher_one():
    upward = [f"{module} (floor {floor_of(module)}) imports {target} (floor {floor_of(target)})"
              for module, targets in import_graph().items() for target in sorted(targets)
              if floor_of(target) > floor_of(module)]
    assert upward == []


def test_no_private_name_imported_from_another_module():
    taken = [f"{module}:{line} takes {target}.{name}" for module in MODULES
             for target, name, line in imports_of(module) if name.startswith("_") and not name.startswith("__")]
    for module, path in MODULES.items():  # `module._name` of an imported cnc_jax module
        imported = {alias.asname or alias.name for node in ast.walk(ast.parse(path.read_text()))
                    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cnc_jax")
                    for alias in node.names if f"{node.module}.{alias.name}" in MODULES}
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in imported
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                taken.append(f"{module}:{node.lineno} takes {node.value.id}.{node.attr}")
    assert taken == []


def lazy_imports_without_reason(source: str) -> list[int]:
    """Lines of cnc_jax imports inside functions with no comment saying why: on the line itself, or on the line
    above the block of imports it stands in."""
    lines = source.split("\n")
    found = set()
    for function in ast.walk(ast.parse(source)):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        imports = [n for n in ast.walk(function) if isinstance(n, (ast.Import, ast.ImportFrom))]
        import_lines = {line for n in imports for line in range(n.lineno, n.end_lineno + 1)}
        for node in imports:
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            if not any(name.startswith("cnc_jax") for name in names) or "#" in lines[node.lineno - 1]:
                continue
            above = node.lineno - 1  # 1-based line above the statement
            while above in import_lines:
                above -= 1
            if not (above >= 1 and lines[above - 1].strip().startswith("#")):
                found.add(node.lineno)
    return sorted(found)


def test_imports_inside_functions_say_why():
    """Imports sit at the top; one inside a function (start-up time of a command, an optional package) says why."""
    silent = [f"{module}:{line}" for module, path in MODULES.items()
              for line in lazy_imports_without_reason(path.read_text())]
    assert silent == []


def test_a_circle_and_an_upward_import_are_found():
    """The checks themselves: a made-up circle and a made-up upward import are reported."""
    graph = {"cnc_jax.a": {"cnc_jax.b"}, "cnc_jax.b": {"cnc_jax.c"}, "cnc_jax.c": {"cnc_jax.a"}, "cnc_jax.d": set()}
    assert circles(graph) == [["cnc_jax.a", "cnc_jax.b", "cnc_jax.c"]]
    assert floor_of("cnc_jax.models.unet") > floor_of("cnc_jax.torchfile.tensor")
    with pytest.raises(AssertionError, match="on no floor"):
        floor_of("cnc_jax.somewhere_new")
    lazy = ("def f():\n    from cnc_jax.io import write_png\n\n\n"
            "def g():\n    # start-up time\n    from cnc_jax.io import write_png\n"
            "    from cnc_jax.io import to_uint8\n")
    assert lazy_imports_without_reason(lazy) == [2]
