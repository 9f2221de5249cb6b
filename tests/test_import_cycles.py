"""No package-level import cycles inside moex: data flows one way (see docs/architecture.md).

Every `import moex.…` / `from moex… import …` in every module counts, also the ones inside
functions (a lazy import hides a cycle from Python, not from the reader). A module's node is
its subpackage (`moex.training`) or, for a top-level module, the module (`moex.config`).
"""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "moex"


def _node(dotted: str) -> str | None:
    parts = dotted.split(".")
    if parts[0] != "moex" or len(parts) < 2:
        return None
    return "moex." + parts[1]


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """moex modules that `path` imports (absolute, resolved from relative imports)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for n in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(n, ast.Import):
            out.update(a.name for a in n.names)
        elif isinstance(n, ast.ImportFrom):
            base = n.module or ""
            if n.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - n.level + 1] + ([base] if base else []))
            for a in n.names:  # `from moex import config` imports the module moex.config
                sub = f"{base}.{a.name}"
                out.add(sub if (PKG.parent / sub.replace(".", "/")).with_suffix(".py").exists()
                        or (PKG.parent / sub.replace(".", "/")).is_dir() else base)
    return {m for m in out if m == "moex" or m.startswith("moex.")}


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        src = _node(_module_name(path))
        if src is None:
            continue
        for dst in map(_node, _imports(path)):
            if dst is not None and dst != src:
                graph.setdefault(src, set()).add(dst)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_known_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_moex_has_no_package_import_cycle():
    graph = package_graph()
    assert graph.get("moex.training") and "moex.checkpoint" in graph["moex.training"]  # the walk sees imports
    found = cycles(graph)
    detail = {" <-> ".join(c): {v: sorted(graph[v] & set(c)) for v in c} for c in found}
    assert not found, f"package import cycles: {detail}"
