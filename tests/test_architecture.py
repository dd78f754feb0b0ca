"""The shape of the code, kept by tests (issue 17): every function fits on a screen, and no module
of ``src/cuba`` imports itself back through others -- function-local imports count (a cycle
hidden in a function is still a cycle), imports under ``TYPE_CHECKING`` do not."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, tuple[Path, list[str]]]:
    """dotted name -> (file, the package it lives in, as name parts)."""
    out = {}
    for p in sorted((SRC / "cuba").rglob("*.py")):
        parts = list(p.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
            out[".".join(parts)] = (p, parts)
        else:
            out[".".join(parts)] = (p, parts[:-1])
    return out


def import_graph() -> dict[str, set[str]]:
    """Edges module -> modules of src/cuba it imports, anywhere in its body but under TYPE_CHECKING;
    importing a.b.c also runs the packages a.b and a, so those count as imported too."""
    mods = _modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, (path, pkg) in mods.items():
        tree = ast.parse(path.read_text())
        typing_only = {id(n) for node in ast.walk(tree)
                       if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            targets = []
            if isinstance(node, ast.ImportFrom):
                base = ".".join(pkg[: len(pkg) - node.level + 1] + (node.module or "").split(".")).strip(".") if node.level else (node.module or "")
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for t in targets:
                parts = t.split(".")
                for i in range(2, len(parts) + 1):
                    name = ".".join(parts[:i])
                    if name in mods and name != m and not m.startswith(name + "."):
                        edges[m].add(name)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_no_import_cycle_inside_src_cuba() -> None:
    edges = import_graph()
    assert {"cuba.config", "cuba.attack"} <= set(edges["cuba.config"]) | {"cuba.config"}  # the graph sees imports
    assert cycles(edges) == []


def test_cycle_finder_finds_a_planted_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_function_longer_than_a_screen() -> None:
    long = []
    for path in sorted((SRC / "cuba").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({n} lines)")
    assert long == []


def test_readme_layout_lists_every_top_level_module_once() -> None:
    readme = (SRC.parent / "README.md").read_text()
    block = readme[readme.index("## Layout"):]
    block = block[block.index("```\nsrc/cuba/") + 4: block.index("```", block.index("```\nsrc/cuba/") + 4)]
    listed = [ln.split()[0] for ln in block.splitlines()[1:] if ln.startswith("  ") and not ln.startswith("   ")]
    tree = sorted(p.name + ("/" if p.is_dir() else "") for p in (SRC / "cuba").iterdir()
                  if p.name != "__pycache__" and (p.is_dir() or p.suffix == ".py"))
    assert sorted(listed) == tree
