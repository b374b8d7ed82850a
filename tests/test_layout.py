"""The shape of the code base: layers point one way, files and functions stay small, the repository stands
alone, and the work directory is only touched through the path library."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

PACKAGE = ROOT / "vqddm_jax"
LIBRARIES = ("models", "diffusion", "autoregressive", "kmeans", "evaluation", "data")


def _module_name(path) -> str:
  rel = path.relative_to(ROOT).with_suffix("")
  parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
  return ".".join(parts)


def _imports(path) -> set[str]:
  """Every `vqddm_jax...` module a file imports (`from a import b` counts as both a and a.b)."""
  tree = ast.parse(path.read_text())
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      found.add(node.module)
      found.update(f"{node.module}.{alias.name}" for alias in node.names)
  return {name for name in found if name.startswith("vqddm_jax")}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
  modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
  return {name: {m for m in _imports(path) if m in modules} for name, path in modules.items()}


def _reachable(graph, start: str) -> set[str]:
  seen, todo = set(), [start]
  while todo:
    for dep in graph.get(todo.pop(), ()):
      if dep not in seen:
        seen.add(dep)
        todo.append(dep)
  return seen


def _resolved_imports(path, modules) -> set[str]:
  """The package modules a file imports, lazy in-function ones included, each resolved to what it names:
  `from a import b` is a.b where that is a module, else a. Unlike `_imports`, a submodule does not count as
  importing its package's __init__ (Python runs that first for any submodule; it is no circle)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      for alias in node.names:
        found.add(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module)
  return found & set(modules)


@pytest.fixture(scope="module")
def resolved_graph() -> dict[str, set[str]]:
  modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
  return {name: _resolved_imports(path, modules) - {name} for name, path in modules.items()}


def _find_cycle(graph) -> list[str] | None:
  """One import circle [a, b, ..., a] of `graph`, or None (depth-first search)."""
  state, stack = {}, []  # state: 1 while on the current path, 2 when done.

  def visit(node):
    state[node] = 1
    stack.append(node)
    for dep in sorted(graph.get(node, ())):
      if state.get(dep) == 1:
        return stack[stack.index(dep):] + [dep]
      if dep not in state and (cycle := visit(dep)):
        return cycle
    stack.pop()
    state[node] = 2
    return None

  for start in sorted(graph):
    if start not in state and (cycle := visit(start)):
      return cycle
  return None


def test_find_cycle_sees_a_lazy_circle():
  assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
  assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_circle(resolved_graph):
  """No module imports itself through others, counting imports inside functions (which only hide a circle)."""
  cycle = _find_cycle(resolved_graph)
  assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_models_are_pure_flax(resolved_graph):
  """models/ knows nothing of runs: no work directory, checkpoints, files, stages or training."""
  banned = tuple(f"vqddm_jax.{name}" for name in ("workdir", "checkpointing", "files", "stages", "training",
                                                  "main"))
  for name in resolved_graph:
    if name.startswith("vqddm_jax.models"):
      bad = {m for m in _reachable(resolved_graph, name) if m.startswith(banned)}
      assert not bad, f"{name} reaches {sorted(bad)}"


def test_stages_never_import_each_other(resolved_graph):
  """What two stages share (the evaluation protocol, restoring models) lives in a library both import."""
  for name, deps in resolved_graph.items():
    if name.startswith("vqddm_jax.stages."):
      siblings = {d for d in deps if d.startswith("vqddm_jax.stages.")}
      assert not siblings, f"{name} imports {sorted(siblings)}"


def test_command_line_modules_are_not_imported_by_their_packages(resolved_graph):
  """`python -m pkg.mod` imports pkg first: if pkg imported mod, runpy warns and mod runs twice."""
  for name, path in {_module_name(p): p for p in PACKAGE.rglob("*.py")}.items():
    if "__name__ == \"__main__\"" not in path.read_text():
      continue
    packages = [name.rsplit(".", i)[0] for i in range(1, name.count(".") + 1)]
    for package in packages:
      assert name not in _reachable(resolved_graph, package), f"{package} imports {name}"


@pytest.mark.parametrize("module", ["vqddm_jax.stages.sample", "vqddm_jax.stages.inpaint",
                                    "vqddm_jax.stages.evaluate", "vqddm_jax.stages.encode",
                                    "vqddm_jax.generation", "vqddm_jax.inference", "vqddm_jax.restore",
                                    "vqddm_jax.evaluation", "vqddm_jax.evaluation.protocol",
                                    "vqddm_jax.ar_generation", "vqddm_jax.evaluation.comparison"])
def test_inference_and_evaluation_never_import_training(graph, module):
  training = {m for m in _reachable(graph, module) if m.startswith("vqddm_jax.training")}
  assert not training, f"{module} reaches training code: {sorted(training)}"


def test_libraries_never_import_stages_or_main(graph):
  for name, deps in graph.items():
    if name.startswith(tuple(f"vqddm_jax.{lib}" for lib in LIBRARIES)) or name.startswith("vqddm_jax.training"):
      bad = {d for d in deps if d.startswith(("vqddm_jax.stages", "vqddm_jax.main"))}
      assert not bad, f"{name} imports {sorted(bad)}"


def test_config_schema_imports_neither_jax_nor_tensorflow():
  code = ("import sys, vqddm_jax.config_schema, vqddm_jax.main; "
          "print(sorted({m.split('.')[0] for m in sys.modules} & {'jax', 'jaxlib', 'tensorflow', 'flax'}))")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "[]", out.stdout


def _python_files():
  for folder in ("vqddm_jax", "benchmarks", "launch", "configs"):
    yield from sorted((ROOT / folder).rglob("*.py"))


def test_files_under_400_lines_and_functions_under_70():
  long_files, long_functions = [], []
  for path in _python_files():
    text = path.read_text()
    if text.count("\n") > 400:
      long_files.append(f"{path.relative_to(ROOT)}: {text.count(chr(10))} lines")
    for node in ast.walk(ast.parse(text)):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        length = node.end_lineno - node.lineno + 1
        if length > 70:
          long_functions.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {length} lines")
  assert not long_files and not long_functions, long_files + long_functions


def _tracked_text_files():
  out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                       capture_output=True, text=True, check=True).stdout.split()
  for name in out:
    path = ROOT / name
    if path.suffix in (".py", ".md", ".sh", ".sbatch", ".txt", ".ini", "") and path.is_file():
      yield path


def test_the_repository_stands_alone():
  """No file points outside the clone or talks about how the project is developed."""
  banned = ("../shared", "METHOD.md", "OFFLINE.md", "SCALEOUT.md", "DESIGN.md")
  hits = []
  for path in _tracked_text_files():
    if path.name == "test_layout.py":
      continue
    text = path.read_text(errors="replace")
    hits += [f"{path.relative_to(ROOT)}: {word!r}" for word in banned if word in text]
    hits += [f"{path.relative_to(ROOT)}: {m.group(0)!r}"
             for m in re.finditer(r"\b[Ii]ssues? #?\d+|\bthe lead\b", text)]
  assert not hits, hits
  for doc in ("docs/method.md", "docs/offline.md"):
    assert (ROOT / doc).is_file(), doc


# Modules that write the work directory: they must go through `vqddm_jax.workdir` (which serialises to bytes
# and writes through epath) or epath itself, never the local file API (test_workdir.py runs the writers on a
# non-local file system).
_WORKDIR_WRITERS = ["stages", "training", "generation.py", "ar_generation.py", "data/codes.py", "evaluation/classifier.py"]
_LOCAL_FILE_API = ("open(", "os.path", "os.makedirs", "os.listdir", "os.replace", "glob.glob", "shutil.",
                   "np.save(", "np.savez", "np.load(", "PIL")


def test_workdir_is_only_touched_through_the_path_library():
  hits = []
  for entry in _WORKDIR_WRITERS:
    target = PACKAGE / entry
    for path in ([target] if target.is_file() else sorted(target.rglob("*.py"))):
      for lineno, line in enumerate(path.read_text().splitlines(), 1):
        code = line.split("#", 1)[0]
        if any(api in code for api in _LOCAL_FILE_API) and "os.path.abspath" not in code:
          hits.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()}")
  assert not hits, hits
