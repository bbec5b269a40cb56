"""The package layout holds: router/ is the control plane and depends on no front end, worker, runtime or
dashboard. Checked from the import graph (every import statement, at any depth, followed transitively
through the project's own modules), so a lazy import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ("engine", "prefill_worker", "decode_worker", "router", "kvtransfer", "proto", "pdserve")
# What the control plane must never reach.
FORBIDDEN = ("prefill_worker", "decode_worker", "pdserve.runtime", "pdserve.observability", "pdserve.batch",
             "pdserve.serve", "pdserve.cli")


def _module_file(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _named(name: str) -> set[str]:
    """The project modules the import statements of `name` name, at any depth: for `from P import x`, the
    submodule P.x where there is one, else P."""
    path = _module_file(name)
    assert path is not None, name
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            targets = [f"{base}.{a.name}" if _module_file(f"{base}.{a.name}") else base for a in node.names]
        for t in targets:
            parts = t.split(".")
            if parts[0] not in PROJECT:
                continue
            deepest = next((".".join(parts[:i]) for i in range(len(parts), 0, -1)
                            if _module_file(".".join(parts[:i])) is not None), None)
            if deepest is not None:
                found.add(deepest)
    return found


def _with_packages(modules: set[str]) -> set[str]:
    """The modules and every package above them (importing a.b.c executes a and a.b first)."""
    parts = (m.split(".") for m in modules)
    return {".".join(p[:i]) for p in parts for i in range(1, len(p) + 1) if _module_file(".".join(p[:i]))}


def _imports(name: str) -> set[str]:
    """Project modules that importing `name` executes: its imports plus their parent packages."""
    return _with_packages(_named(name))


def reachable(start: list[str]) -> dict[str, str]:
    """Every project module reachable from `start` -> the module that first imported it."""
    seen = {s: s for s in start}
    todo = list(start)
    while todo:
        mod = todo.pop()
        for dep in _imports(mod):
            if dep not in seen:
                seen[dep] = mod
                todo.append(dep)
    return seen


def _path_to(seen: dict[str, str], mod: str) -> str:
    chain = [mod]
    while seen[chain[-1]] != chain[-1]:
        chain.append(seen[chain[-1]])
    return " <- ".join(chain)


def test_router_is_control_plane_only():
    modules = ["router"] + [f"router.{p.stem}" for p in (ROOT / "router").glob("*.py") if p.stem != "__init__"]
    assert {"router.router", "router.queue", "router.placement", "router.request"} <= set(modules)
    assert not [p for p in (ROOT / "router").iterdir() if p.is_dir() and p.name != "__pycache__"], \
        "router/ holds subpackages again"
    seen = reachable(modules)
    bad = [_path_to(seen, m) for m in seen if m.startswith(FORBIDDEN)]
    assert not bad, "router/ imports:\n" + "\n".join(bad)


def test_the_openai_protocol_belongs_to_no_front_end():
    """pdserve/openai is what run-batch and the online server share: it imports neither, nor what runs them."""
    modules = ["pdserve.openai"] + [f"pdserve.openai.{p.stem}" for p in (ROOT / "pdserve/openai").glob("*.py")]
    seen = reachable(modules)
    bad = [_path_to(seen, m) for m in seen
           if m.startswith(("pdserve.batch", "pdserve.serve", "pdserve.cli", "pdserve.runtime", "pdserve.bench"))]
    assert not bad, "pdserve/openai imports:\n" + "\n".join(bad)
    assert "pdserve.openai.requests" in seen and "router.request" in seen


def test_import_graph_sees_lazy_imports():
    """The checker itself: a function-level import (run.py imports the deployment lazily) is followed."""
    seen = reachable(["pdserve.batch.run"])
    assert "pdserve.runtime.deployment" in seen
    assert "decode_worker.worker" in seen  # through pdserve.runtime.cluster


def test_both_routers_offer_the_router_api():
    """The local Router and the deployment's RemoteRouter answer the same calls (router.api.RouterAPI)."""
    import inspect

    from pdserve.runtime.deployment import RemoteRouter
    from proto.workers import WorkerSet
    from router.api import RouterAPI
    from router.router import Router, RouterConfig

    for cls in (Router, RemoteRouter):
        for name in ("submit", "abort", "tick", "snapshot"):
            want = list(inspect.signature(getattr(RouterAPI, name)).parameters)
            assert list(inspect.signature(getattr(cls, name)).parameters) == want, (cls.__name__, name)
        assert isinstance(inspect.getattr_static(cls, "done"), property), cls.__name__
    router = Router(WorkerSet(prefill={}, decode={}), RouterConfig(), on_finished=lambda r: None)
    assert isinstance(router, RouterAPI)


def test_abort_a_queued_request_frees_everything():
    from engine.config import SamplingParams
    from proto.workers import WorkerSet
    from router.placement import DecodeCapacity
    from router.request import Request, State
    from router.router import Router, RouterConfig

    finished = []
    router = Router(WorkerSet(prefill={}, decode={}), RouterConfig(), on_finished=finished.append)
    router.placement.add_worker(DecodeCapacity("decode-0", num_blocks=64, block_size=16, max_num_seqs=8))
    reqs = [Request(f"r{i}", f"c{i}", i, "completion", [1] * 20, SamplingParams(max_tokens=8)) for i in range(3)]
    for r in reqs:
        router.submit(r)
    assert len(router.queue) == 3
    assert router.abort("r1", "client disconnected")
    assert not router.abort("r1", "again"), "an aborted request is no longer in flight"
    assert not router.abort("nope", "unknown")
    assert finished == [reqs[1]] and reqs[1].state == State.FAILED
    assert reqs[1].error == "aborted: client disconnected"
    assert len(router.queue) == 2 and set(router.active) == {"r0", "r2"}
    for rid in ("r0", "r2"):
        router.abort(rid, "cleanup")
    assert router.done and len(router.queue) == 0 and router.placement.held_blocks() == 0


# ---- no import cycle --------------------------------------------------------------------------------
# Cycles known and accepted, each as the set of its modules: none.
KNOWN_CYCLES: list[set[str]] = []


def _project_modules() -> list[str]:
    modules = []
    for top in PROJECT:
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return modules


def _dependencies(name: str) -> set[str]:
    """The import graph's edges out of `name`: the modules its imports name and the packages above them,
    except the packages `name` lies in (Python has begun them before `name` runs, so importing a sibling
    does not run them again) unless an import names one of them itself."""
    named = _named(name)
    parts = name.split(".")
    own = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    return (named | (_with_packages(named) - own)) - {name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a path that returns to its start) per strongly connected component of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[set[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while (w := stack.pop()) != v:
                component.add(w)
            components.append(component | {v})

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_through(graph, c) for c in components if len(c) > 1]


def _cycle_through(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """The shortest path from the component's first module back to itself, inside the component."""
    start = min(component)
    paths = {start: [start]}
    todo = [start]
    while todo:
        v = todo.pop(0)
        for w in sorted(graph[v] & component):
            if w == start:
                return paths[v] + [start]
            if w not in paths:
                paths[w] = paths[v] + [w]
                todo.append(w)
    raise AssertionError(f"no cycle in {component}")


def test_no_import_cycles():
    """No module reaches itself through imports, lazy ones inside functions included: each cycle is named."""
    graph = {m: _dependencies(m) for m in _project_modules()}
    assert all(dep in graph for deps in graph.values() for dep in deps)
    cycles = _cycles(graph)
    unknown = [" -> ".join(c) for c in cycles if set(c) not in KNOWN_CYCLES]
    assert not unknown, "import cycles:\n" + "\n".join(unknown)
    gone = [known for known in KNOWN_CYCLES if known not in [set(c) for c in cycles]]
    assert not gone, f"these cycles are gone: remove them from KNOWN_CYCLES: {gone}"


def test_cycle_finder_names_a_cycle_hidden_in_a_function():
    """The checker itself, on a made-up graph, and on the project: a lazy import is an edge like any other."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert _cycles(graph) == [["a", "b", "c", "a"]]
    assert "pdserve.runtime.actors" in _dependencies("pdserve.runtime.cluster")  # imported inside start_workers
    assert "pdserve.cli" not in _dependencies("pdserve.cli.run_batch")  # its own package: begun before it
    assert "pdserve.cli" in _dependencies("pdserve.jobs")


# ---- no long function where people read first ------------------------------------------------------
MAX_FUNCTION_LINES = 60
READ_FIRST = ("router", "prefill_worker", "decode_worker", "pdserve/cli", "pdserve/serve")


def _functions(path: Path):
    """(qualified name, lines) of every function and method in the file, nested ones included."""
    def walk(node: ast.AST, prefix: str):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    yield name, child.end_lineno - child.lineno + 1
                yield from walk(child, name + ".")
            else:
                yield from walk(child, prefix)

    yield from walk(ast.parse(path.read_text(), str(path)), "")


def test_no_function_over_60_lines_where_people_read_first():
    long = [f"{path.relative_to(ROOT)}: {name} ({lines} lines)"
            for folder in READ_FIRST for path in sorted((ROOT / folder).rglob("*.py"))
            for name, lines in _functions(path) if lines > MAX_FUNCTION_LINES]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)
