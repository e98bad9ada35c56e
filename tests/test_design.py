"""The import rules docs/design.md states, checked on the source: layers import only downwards,
no module imports itself back through others, the light modules import no JAX, and every
documented command answers --help."""

import ast
import dataclasses
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("bn_jax", "experiments", "benchmarks")
# Who may import whom (docs/design.md, "Three packages"): the library never reaches up into the studies or
# the developer tools, and the studies never into the tools.
FORBIDDEN = {"bn_jax": ("experiments", "benchmarks"), "experiments": ("benchmarks",), "benchmarks": ("experiments",)}
# Modules the command line loads before it knows it will train: no JAX, so --help answers at once.
LIGHT = ("bn_jax.names", "bn_jax.dataset_registry", "bn_jax.config", "bn_jax.pack_config", "bn_jax.workdir", "bn_jax.preemption", "bn_jax.cli",
         "bn_jax.orbax_failures", "experiments.cifar", "experiments.imagenet", "experiments.sweep")
HEAVY = ("jax", "flax", "optax", "orbax", "numpy")


def modules():
    """{dotted module name: path} of every module of the three packages."""
    out = {}
    for package in PACKAGES:
        for name in sorted(os.listdir(os.path.join(ROOT, package))):
            if name.endswith(".py"):
                module = package if name == "__init__.py" else f"{package}.{name[:-3]}"
                out[module] = os.path.join(ROOT, package, name)
    return out


def imports_of(path, known):
    """The project modules a file imports, anywhere in it (a function's lazy import counts too)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n in known}
    return found


@pytest.fixture(scope="module")
def graph():
    known = modules()
    return {m: imports_of(p, known) - {m.split(".")[0]} for m, p in known.items()}


def test_layers_import_only_downwards(graph):
    bad = [f"{m} imports {i}" for m, deps in graph.items() for i in deps
           if i.split(".")[0] in FORBIDDEN[m.split(".")[0]]]
    assert not bad, bad


def find_cycle(graph):
    """A list of modules that import each other round in a circle, or None."""
    state = {}

    def visit(module, path):
        if state.get(module) == "open":
            return path[path.index(module):] + [module]
        if state.get(module) == "done":
            return None
        state[module] = "open"
        for dep in sorted(graph[module]):
            cycle = visit(dep, path + [module])
            if cycle:
                return cycle
        state[module] = "done"
        return None

    return next((c for c in (visit(m, []) for m in sorted(graph)) if c), None)


def test_no_import_cycle(graph):
    assert find_cycle(graph) is None


def test_the_cycle_check_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_light_modules_import_no_jax():
    code = ("import importlib, sys\n"
            f"for m in {LIGHT!r}:\n    importlib.import_module(m)\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def documented_commands():
    """Every ``python -m <module>`` of this project named in README.md and docs/*.md."""
    texts = [open(os.path.join(ROOT, "README.md")).read()]
    docs = os.path.join(ROOT, "docs")
    texts += [open(os.path.join(docs, n)).read() for n in sorted(os.listdir(docs)) if n.endswith(".md")]
    found = set()
    for text in texts:
        found |= set(re.findall(r"python -m ((?:experiments|benchmarks)\.\w+)", text))
    return sorted(found)


def test_the_docs_name_the_commands():
    assert {"experiments.cifar", "experiments.imagenet", "experiments.sweep", "experiments.analyze",
            "benchmarks.benchmark", "benchmarks.gpu_check"} <= set(documented_commands())


@pytest.mark.slow
@pytest.mark.parametrize("module", documented_commands())
def test_every_documented_command_answers_help(module):
    out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith(f"usage: python -m {module}"), out.stdout[:200]


def protocol_methods(protocol):
    return {n for n, v in vars(protocol).items() if (callable(v) or isinstance(v, property)) and not n.startswith("_")}


def test_both_programs_offer_what_the_loop_asks_of_a_program():
    from bn_jax import program, streaming
    for cls in (program.DeviceResidentProgram, program.StreamingProgram):
        missing = protocol_methods(program.Program) - set(dir(cls))
        assert not missing, (cls.__name__, missing)
    for cls in (program.ResidentInput, streaming.StreamInput):
        missing = protocol_methods(program.ProgramInput) - set(dir(cls))
        assert not missing, (cls.__name__, missing)
    assert protocol_methods(program.Program) >= {"run", "evaluate", "position", "put", "zero_totals", "close"}
    from bn_jax import datasets
    for cls in (datasets.Dataset, streaming.StreamData):
        missing = (protocol_methods(program.Data) | set(program.Data.__annotations__)) - \
            set(dir(cls)) - {f.name for f in dataclasses.fields(cls)}
        assert not missing, (cls.__name__, missing)


def test_functions_and_classes_stay_readable():
    """No function over 60 lines and no class over 120 (docs/design.md): split, don't grow."""
    long = []
    for module, path in modules().items():
        for node in ast.walk(ast.parse(open(path).read())):
            limit = 60 if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else \
                120 if isinstance(node, ast.ClassDef) else None
            if limit and node.end_lineno - node.lineno + 1 > limit:
                long.append(f"{module}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not long, long
