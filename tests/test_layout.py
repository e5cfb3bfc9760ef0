"""The house rules of the layout, checked: core/ never imports features/, no module imports
another in a cycle, every module imports alone, and train.py stays short."""

import ast
import importlib.util
import subprocess
import sys

from conftest import ROOT

PACKAGES = ("core", "features")
TRAIN_PY_MAX_LINES = 350  # room for a few more features (docs/adding-a-feature.md: about three lines each)


def _modules() -> list[str]:
    return sorted(f"{pkg}.{p.stem}" for pkg in PACKAGES for p in (ROOT / pkg).glob("*.py") if p.stem != "__init__")


def _imports(module: str) -> set[str]:
    """The core/features modules `module` imports anywhere in its file (function-local imports too)."""
    tree = ast.parse((ROOT / (module.replace(".", "/") + ".py")).read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
            if node.module in PACKAGES:  # from core import data, UserError
                found |= {f"{node.module}.{a.name}" for a in node.names
                          if (ROOT / node.module / f"{a.name}.py").exists()} or {node.module}
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] in PACKAGES}
    return found - {module}


def test_core_imports_nothing_from_features():
    offenders = {m: sorted(i for i in _imports(m) if i.startswith("features")) for m in _modules()
                 if m.startswith("core.")}
    assert not {m: i for m, i in offenders.items() if i}, "core/ must not import features/"


def test_no_import_cycles():
    graph = {m: _imports(m) for m in _modules()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return path[path.index(n):] + [n] if n in path else [m, n]
            if n not in state and (cycle := visit(n, path + [n])):
                return cycle
        state[m] = 2
        return None

    for m in graph:
        if m not in state:
            cycle = visit(m, [m])
            assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_features_import_core_not_each_other():
    """A feature imports core/; another feature only where the two are one mechanism."""
    one_mechanism = {("features.sequence_parallel", "features.ring_attention"),  # ring attention is an --sp-mode
                     ("features.gptq", "features.lora")}  # --gptq --lora: peft's adapters on GPTQ linears
    pairs = {(m, i) for m in _modules() if m.startswith("features.") for i in _imports(m) if i.startswith("features.")}
    assert pairs <= one_mechanism, f"feature modules importing each other: {sorted(pairs - one_mechanism)}"


# Modules of GPU kernels, imported only on CUDA, and the package each needs at import
GPU_ONLY = {"core.nf4_kernels": "triton"}


def test_every_module_imports_alone():
    """Each module imported first, in a fresh process (an import cycle or a missing import shows here).
    The heavy libraries load once in a parent that forks one child per module. A GPU-only module is
    left out where its package is not installed (a CPU build of torch comes without Triton)."""
    names = [m for m in _modules() if m not in GPU_ONLY or importlib.util.find_spec(GPU_ONLY[m])]
    script = ("import importlib, os, sys, traceback\n"
              f"sys.path.insert(0, {str(ROOT)!r})\n"
              "import torch, transformers, tyro  # noqa: F401  (shared by every child; not ours)\n"
              f"for name in {names!r}:\n"
              "    pid = os.fork()\n"
              "    if pid == 0:\n"
              "        try:\n"
              "            importlib.import_module(name)\n"
              "            os._exit(0)\n"
              "        except BaseException:\n"
              "            print(name + ': ' + traceback.format_exc().splitlines()[-1], flush=True)\n"
              "            os._exit(1)\n"
              "    os.waitpid(pid, 0)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr[-2000:]


def test_train_py_stays_short():
    lines = len((ROOT / "train.py").read_text().splitlines())
    assert lines <= TRAIN_PY_MAX_LINES, \
        f"train.py has {lines} lines (about 300 is the aim); move what is not the story to core/"


def test_readme_is_for_users():
    size = len((ROOT / "README.md").read_bytes())
    assert size < 12_000, f"README.md is {size} bytes; move prose to docs/ and numbers to benchmarks/results/"
