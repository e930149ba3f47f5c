"""The packages import in one direction, and no module imports itself back through others.

converters -> service.energy -> service.models / service.jobs -> service.release -> service.rpc
-> service.client / service.cli (docs/ARCHITECTURE.md). service.api (generated protos) imports
nothing of ours. Every import counts, also those inside functions and under TYPE_CHECKING.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
API, ENERGY, MODELS, JOBS = "service.api", "service.energy", "service.models", "service.jobs"
RELEASE, RPC, CLIENT, CLI = "service.release", "service.rpc", "service.client", "service.cli"
MAY_IMPORT = {  # package -> the packages it may import besides itself
    "converters": set(),
    API: set(),
    ENERGY: {"converters"},
    MODELS: {"converters", ENERGY},
    JOBS: {"converters", ENERGY, API},
    RELEASE: {"converters", ENERGY, JOBS, API},
    RPC: {"converters", ENERGY, MODELS, JOBS, RELEASE, API},
    CLIENT: {API, RPC + ".messages", JOBS + ".errors"},
    CLI: {"converters", ENERGY, MODELS, JOBS, RELEASE, RPC, CLIENT, API},
}


def package_of(module: str) -> str | None:
    return max((p for p in MAY_IMPORT if module == p or module.startswith(p + ".")), key=len, default=None)


def imports(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the project modules it imports (``from a import b`` names a.b when a.b is a module)."""
    files = {
        ".".join(f.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): f
        for top in ("converters", "service")
        for f in (root / top).rglob("*.py")
        if "preimage_pb2" not in f.name
    }
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.update(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                             for a in node.names)  # fmt: skip
        graph[module] = {m for m in found if m in files and m != module}
    return graph


def allowed(source: str, target: str) -> bool:
    src, dst = package_of(source), package_of(target)
    if src is None or dst is None or src == dst:
        return True
    return any(target == p or target.startswith(p + ".") for p in MAY_IMPORT[src])


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(w)
            if component:
                found.append(sorted([v, *component]))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_imports_point_one_way() -> None:
    graph = imports()
    wrong = sorted(f"{s} imports {t}" for s, targets in graph.items() for t in targets if not allowed(s, t))
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles() -> None:
    assert cycles(imports()) == []


def test_the_check_catches_a_violation(tmp_path: Path) -> None:
    for name, text in {
        "converters/__init__.py": "",
        "converters/a.py": "from converters import b\n",
        "converters/b.py": "def f():\n    import converters.a\n",
        "service/__init__.py": "",
        "service/energy/__init__.py": "from service.jobs.job import Job\n",
        "service/jobs/__init__.py": "",
        "service/jobs/job.py": "Job = 1\n",
    }.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = imports(tmp_path)
    assert not allowed("service.energy", "service.jobs.job")
    assert graph["service.energy"] == {"service.jobs.job"}
    assert cycles(graph) == [["converters.a", "converters.b"]]
