"""kvlab's module graph: no import circles, and lower layers never import higher ones.

The scan reads every module under kvlab/ with `ast` and records every import of a kvlab module,
including the ones made inside functions (a circle closed inside a function still is one: it only
works by the accident of import order). LAYERS below is the order a reader can walk the library in,
from the bottom up; a module may import its own layer (without a circle) and the layers below it.
kvlab/README.md shows the same order.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "kvlab"

# Bottom to top. A name is a module or package under kvlab/ (a package's submodules go with it
# unless listed themselves, e.g. "bench.cli").
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundations", ("device", "files", "validation", "_cli")),
    ("text", ("tokenizers", "data", "data.batches", "data.seq2seq_toy")),
    ("model parts", ("attention", "cache", "quantized", "layers", "latent", "eviction", "lowbit")),
    ("models", ("gpt", "seq2seq", "pretrained", "train")),
    ("generation", ("sampling", "compiled", "generation")),
    ("beyond one token", ("beam", "speculative", "paged", "serving", "cpu_kernels", "models")),
    ("measurement", ("bench", "viz")),
    ("command lines", ("generate", "generation.cli", "train.cli", "train.__main__", "bench.cli", "bench.__main__",
                       "dashboard", "__main__")),
    # The course's own code (checks, bug zoo, widgets, student tools), on top of the library: nothing
    # in the library imports it. kvlab/student.py is only the command's name for course.student.
    ("course", ("course", "student")),
    ("the package", ("",)),  # kvlab/__init__.py: re-exports the public API; course code only on first use
]


def module_files(package: Path = PACKAGE) -> dict[str, Path]:
    """{dotted name relative to kvlab ("" for kvlab itself, "bench.cli", ...): file}."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(package: Path = PACKAGE) -> dict[str, set[str]]:
    """{module: the kvlab modules it imports anywhere in its file}, names relative to kvlab."""
    modules = module_files(package)

    def known(name: str) -> str:
        while name not in modules and "." in name:
            name = name.rsplit(".", 1)[0]
        return name if name in modules else ""

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        here = [p for p in here if p]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == "kvlab" or alias.name.startswith("kvlab."):
                        targets.add(known(alias.name.removeprefix("kvlab").lstrip(".")))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here[: len(here) - node.level + 1] if node.level > 1 else here
                    base = ".".join(base + ([node.module] if node.module else []))
                elif node.module == "kvlab" or (node.module or "").startswith("kvlab."):
                    base = node.module.removeprefix("kvlab").lstrip(".")
                else:
                    continue
                for alias in node.names:
                    full = f"{base}.{alias.name}" if base else alias.name
                    targets.add(known(full) if full in modules else known(base))
        targets.discard(name)
        graph[name] = targets
    return graph


def layer_of(name: str) -> int:
    best, best_len = None, -1
    for i, (_, members) in enumerate(LAYERS):
        for member in members:
            if (member == "" and name == "") or (member and (name == member or name.startswith(member + "."))):
                if len(member) > best_len:
                    best, best_len = i, len(member)
    if best is None:
        raise KeyError(name)
    return best


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_scan_sees_imports_inside_functions():
    graph = imports()
    assert "bench.timing" in graph["bench.cache_speedup"]  # a module-level relative import
    assert "models" in graph["bench.cli"]  # an import inside a function
    assert "generation" in graph[""]  # kvlab/__init__.py


def test_every_module_has_a_layer():
    unplaced = []
    for name in module_files():
        try:
            layer_of(name)
        except KeyError:
            unplaced.append(name or "kvlab")
    assert not unplaced, f"put these modules in LAYERS (tests/test_layering.py): {unplaced}"


def test_no_import_circles():
    cycle = find_cycle({f"kvlab.{k}" if k else "kvlab": {f"kvlab.{t}" if t else "kvlab" for t in v}
                        for k, v in imports().items()})
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_lower_layers_never_import_higher_ones():
    wrong = []
    for name, targets in imports().items():
        for target in targets:
            if layer_of(target) > layer_of(name):
                wrong.append(f"kvlab.{name or '__init__'} ({LAYERS[layer_of(name)][0]}) imports kvlab.{target} "
                             f"({LAYERS[layer_of(target)][0]})")
    assert not wrong, "\n".join(sorted(wrong))


def test_nothing_in_the_library_imports_the_course():
    # kvlab/__init__.py counts as library: its lazy attributes name the course modules as strings only.
    course = {name for name in module_files() if LAYERS[layer_of(name)][0] == "course"}
    assert {"course", "course.checks", "course.checks.gpt", "course.bugzoo", "course.widgets", "course.student",
            "student"} <= course
    wrong = sorted(f"kvlab.{name or '__init__'} imports kvlab.{target}" for name, targets in imports().items()
                   if name not in course for target in targets if target in course)
    assert not wrong, "\n".join(wrong)


def test_importing_kvlab_loads_no_course_code_and_the_short_names_still_work():
    # The chapters write `from kvlab import checks` (bugzoo, widgets): kvlab's lazy attributes
    # load kvlab.course's module then, and not before.
    import subprocess
    import sys

    code = ("import sys, kvlab; assert not [m for m in sys.modules if m.startswith('kvlab.course')], 'loaded early'\n"
            "from kvlab import bugzoo, checks, widgets\n"
            "import kvlab.course.bugzoo, kvlab.course.checks, kvlab.course.widgets\n"
            "assert checks is kvlab.course.checks and kvlab.checks is checks\n"
            "assert bugzoo is kvlab.course.bugzoo and widgets is kvlab.course.widgets\n"
            "assert kvlab.checks.check_alibi_bias is kvlab.course.checks.attention.check_alibi_bias\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cache_imports_nothing_above_it():
    # Chapter 4's cache stands on the foundations alone: not even its own layer's int8 caches.
    assert all(layer_of(t) < layer_of("cache") for t in imports()["cache"]), imports()["cache"]


@pytest.mark.parametrize("source, expected", [
    ("from .cache import KVCache\nfrom . import gpt\n", {"cache", "gpt"}),
    ("def f():\n    from .generation import generate\n", {"generation"}),
    ("import kvlab.bench.timing\n", {"bench.timing"}),
    ("from kvlab.bench import sweep\n", {"bench"}),
])
def test_the_scan_on_small_packages(tmp_path, source, expected):
    pkg = tmp_path / "kvlab"
    (pkg / "bench").mkdir(parents=True)
    for name in ("__init__.py", "cache.py", "gpt.py", "generation.py", "bench/__init__.py", "bench/timing.py"):
        (pkg / name).write_text("")
    (pkg / "mod.py").write_text(source)
    assert imports(pkg)["mod"] == expected


def test_a_circle_closed_inside_a_function_is_found(tmp_path):
    pkg = tmp_path / "kvlab"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "cache.py").write_text("def f():\n    from .quantized import x\n")
    (pkg / "quantized.py").write_text("from .cache import f\n")
    graph = {f"kvlab.{k}": {f"kvlab.{t}" for t in v} for k, v in imports(pkg).items()}
    assert find_cycle(graph) == ["kvlab.cache", "kvlab.quantized", "kvlab.cache"]


def test_no_module_is_hidden_behind_a_function_of_the_same_name():
    # `from .x import x` in a package's __init__ puts the function where the module was:
    # `import kvlab.pkg.x as m` then gives the function. kvlab.generate is the one module that
    # shares its name with a function on purpose: it is made callable as that function
    # (see kvlab/generate.py).
    import importlib
    import types

    clashes = []
    for name in module_files():
        if not name or name.endswith("__main__"):
            continue
        module = importlib.import_module(f"kvlab.{name}")
        parent = importlib.import_module("kvlab" + ("." + name.rsplit(".", 1)[0] if "." in name else ""))
        attribute = getattr(parent, name.rsplit(".", 1)[-1])
        if attribute is not module and not isinstance(attribute, types.ModuleType):
            clashes.append(f"kvlab.{name}")
    assert not clashes, clashes
    import kvlab

    assert callable(importlib.import_module("kvlab.generate")) and callable(kvlab.generate)


def test_no_private_name_is_imported_from_another_module():
    # `from .x import _y` makes _y part of x's interface in all but name. Private modules
    # (kvlab._cli, kvlab.course.checks._common) may be imported; private names from them may not.
    modules = module_files()
    module_names = {m.rsplit(".", 1)[-1] for m in modules}
    wrong = []
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("kvlab")):
                if node.module and node.module.removeprefix("kvlab.") == name:
                    continue  # a module importing from itself (inside a function)
                for alias in node.names:
                    if alias.name.startswith("_") and alias.name not in module_names:
                        wrong.append(f"kvlab.{name or '__init__'}: from {'.' * node.level}{node.module or ''} "
                                     f"import {alias.name}")
    assert not wrong, "\n".join(wrong)


def test_no_module_outside_the_cache_modules_assigns_a_layer_caches_tensors():
    # Beam search, speculative decoding and the compiled step call the caches' own reorder / crop /
    # mark_written; only kvlab.cache and kvlab.quantized assign what a layer cache holds.
    names = {"k", "v", "pos", "length", "k_scale", "v_scale", "k_offset", "v_offset"}
    wrong = []
    for name, path in module_files().items():
        if name in ("cache", "quantized"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = node.targets if isinstance(node, ast.Assign) else (
                [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
            for target in targets:
                for t in ast.walk(target):
                    if isinstance(t, ast.Attribute) and t.attr in names and not (
                            isinstance(t.value, ast.Name) and t.value.id == "self"):
                        wrong.append(f"kvlab.{name}:{node.lineno} assigns .{t.attr}")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr":
                if node.args and isinstance(node.args[0], ast.Name) and node.args[0].id == "layer":
                    wrong.append(f"kvlab.{name}:{node.lineno} setattr(layer, ...)")
    assert not wrong, "\n".join(wrong)
