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


def _imports(name: str) -> set[str]:
    """Project modules that importing `name` executes: its imports plus their parent packages."""
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
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            if t.split(".")[0] not in PROJECT:
                continue
            parts = t.split(".")
            for i in range(1, len(parts) + 1):
                if _module_file(".".join(parts[:i])) is not None:
                    found.add(".".join(parts[:i]))
    return found


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


def test_import_graph_sees_lazy_imports():
    """The checker itself: a function-level import (run.py imports the deployment lazily) is followed."""
    seen = reachable(["pdserve.batch.run"])
    assert "pdserve.runtime.deployment" in seen
    assert "decode_worker.worker" in seen  # through pdserve.runtime.cluster


def test_both_routers_offer_the_router_api():
    """The local Router and the deployment's RemoteRouter answer the same calls (router.api.RouterAPI)."""
    import inspect

    from pdserve.runtime.deployment import RemoteRouter
    from router.api import RouterAPI
    from router.router import Router, RouterConfig, WorkerSet

    for cls in (Router, RemoteRouter):
        for name in ("submit", "abort", "tick", "snapshot"):
            want = list(inspect.signature(getattr(RouterAPI, name)).parameters)
            assert list(inspect.signature(getattr(cls, name)).parameters) == want, (cls.__name__, name)
        assert isinstance(inspect.getattr_static(cls, "done"), property), cls.__name__
    router = Router(WorkerSet(prefill={}, decode={}), RouterConfig(), on_finished=lambda r: None)
    assert isinstance(router, RouterAPI)


def test_abort_a_queued_request_frees_everything():
    from engine.config import SamplingParams
    from router.placement import DecodeCapacity
    from router.request import Request, State
    from router.router import Router, RouterConfig, WorkerSet

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
