"""The code's layout holds: each package imports only what docs/architecture.md allows, no import
cycle between modules, no module reaches into another's `_private` names, no file grows past the
size a reader can hold, and only ratray/workdir.py spells out the workdir's folders.

Read from the source with `ast` (nothing is imported), so a violation names the file and line.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ratray"
MAX_LINES = 460  # "about 450": a file a reader can hold in mind

# home → modules (prefixes) it must never import, at any depth of a function: the table of
# docs/architecture.md. "torch"/"ray" stand for the packages and everything below them.
FORBIDDEN = {
    "ratray.config": ["ray", "torch", "faiss", "ratray.index", "ratray.retro", "ratray.realm",
                      "ratray.train", "ratray.eval"],
    "ratray.workdir": ["ray", "torch", "faiss", "numpy", "ratray."],
    "ratray.pretrained": ["ray", "torch", "faiss", "ratray."],
    "ratray.data": ["ray", "torch", "faiss", "ratray.index", "ratray.retro", "ratray.realm",
                    "ratray.train", "ratray.eval"],
    "ratray.index": ["ratray.retro", "ratray.realm", "ratray.train"],
    "ratray.eval": ["ray", "ratray.index", "ratray.retro", "ratray.realm", "ratray.train"],
    "ratray.build": ["ratray.retro", "ratray.realm", "ratray.train"],
    "ratray.retro": ["ratray.realm"],
    "ratray.realm": ["ratray.retro"],
    "ratray.train": ["ratray.retro", "ratray.realm", "ratray.index", "ratray.build"],
    "ratray.tracking": ["torch", "ray", "ratray.retro", "ratray.realm", "ratray.index"],
    "ratray.retro.config": ["torch", "ray", "faiss"],
    "ratray.realm.config": ["torch", "ray", "faiss"],
    "ratray.retro.model": ["ray", "faiss", "numpy", "ratray.index", "ratray.train", "ratray.data"],
    "ratray.realm.model": ["ray", "faiss", "numpy", "ratray.index", "ratray.train", "ratray.data"],
}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def library_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def imports(path: Path) -> list[tuple[int, str, list[str], bool]]:
    """(line, module, imported names, at module level) of every import in `path`."""
    tree = ast.parse(path.read_text(), str(path))
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, [], id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module, [a.name for a in node.names], id(node) in top))
    return out


def under(module: str, prefix: str) -> bool:
    return module == prefix.rstrip(".") or module.startswith(prefix if prefix.endswith(".") else prefix + ".")


def forbidden_imports(path: Path, me: str) -> list[str]:
    """The imports of module `me` (source at `path`) that its homes forbid."""
    problems = []
    rules = [(home, banned) for home, banned in FORBIDDEN.items() if under(me, home)]
    for line, mod, _, _ in imports(path):
        for home, banned in rules:
            for b in banned:
                if under(mod, b) and not under(mod, home):
                    problems.append(f"{path.name}:{line}: {me} imports {mod} "
                                    f"({home} must not import {b})")
    return problems


def test_every_home_imports_only_what_it_may():
    problems = [p for path in library_files() for p in forbidden_imports(path, module_name(path))]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("me,source,home", [
    ("ratray.index.probe", "from ratray.retro.model import Retro\n", "ratray.index"),
    ("ratray.config", "def f():\n    import torch\n", "ratray.config"),  # inside a function too
    ("ratray.retro.worker", "import ratray.realm.masking\n", "ratray.retro"),
    ("ratray.train.worker", "from ratray.retro.batches import RetroBatches\n", "ratray.train"),
])
def test_the_layout_rule_catches_a_forbidden_import(tmp_path, me, source, home):
    probe = tmp_path / "probe.py"
    probe.write_text(source)
    problems = forbidden_imports(probe, me)
    assert problems and f"{home} must not import" in problems[0]


def test_no_import_cycle_between_library_modules():
    graph: dict[str, set[str]] = {}
    names = {module_name(p) for p in library_files()}
    for path in library_files():
        me = module_name(path)
        deps = set()
        for _, mod, _, top in imports(path):
            if top and mod in names and mod != me:
                deps.add(mod)
        graph[me] = deps
    # a module's package __init__ runs first: treat "a.b.c" as depending on "a.b" too
    for me in graph:
        parent = me.rsplit(".", 1)[0]
        if parent in graph and parent != me:
            graph[me].add(parent)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_module_imports_another_modules_private_names():
    problems = []
    scripts = [*sorted((ROOT / "jobs").glob("*.py")), *sorted((ROOT / "bench").glob("*.py"))]
    for path in [*library_files(), *scripts]:
        for line, mod, names, _ in imports(path):
            if mod.startswith("ratray"):
                for n in names:
                    if n.startswith("_") and not n.startswith("__"):
                        problems.append(f"{path.relative_to(ROOT)}:{line}: from {mod} import {n}")
    assert not problems, "\n".join(problems)


def test_no_library_file_outgrows_a_reader():
    long = [f"{p.relative_to(ROOT)}: {n} lines" for p in library_files()
            if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not long, long


WORKDIR_FOLDERS = re.compile(
    r"""["'/](chunks|embeddings|vectors|runs|ray_results|mlartifacts|mlflow\.db)["']""")


def workdir_path_lines(path: Path) -> list[str]:
    problems = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        code = line.split("#", 1)[0]
        if WORKDIR_FOLDERS.search(code) and re.search(r"/\s*['\"]", code):
            problems.append(f"{path.name}:{i}: {line.strip()}")
    return problems


def test_only_workdir_py_builds_workdir_paths():
    """The workdir's folder names appear as path parts in ratray/workdir.py alone (a folder named
    in a docstring or message is fine; `/ "runs"` or `"chunks"` joined to a path is not)."""
    problems = [p for path in library_files() if path.name != "workdir.py"
                for p in workdir_path_lines(path)]
    assert not problems, "\n".join(problems)


def test_the_workdir_rule_catches_a_path_built_elsewhere(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text('run_dir = Path(job.workdir) / "runs" / name\nstore = wd / "chunks" / key\n')
    assert len(workdir_path_lines(probe)) == 2
    assert workdir_path_lines(ROOT / "ratray" / "workdir.py")  # where they belong
