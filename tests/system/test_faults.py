"""No request lost: worker deaths and transfer failures mid-batch, through a real Ray cluster."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path

import pytest
import ray

from engine.config import EngineConfig
from kvtransfer.shm import SEGMENT_PREFIX, SHM_DIR
from pdserve.batch.run import BatchOptions, run_batch
from pdserve.runtime.cluster import ClusterConfig
from router.calls import CallKind
from router.request import State
from router.router import RouterConfig

pytestmark = pytest.mark.slow

TOPICS = ["rivers", "bread", "the moon", "chess", "volcanoes", "bees", "trains", "glass"]


def write_batch(path: Path, n: int = 64, max_tokens: int = 16, spread: int = 0) -> Path:
    """n chat requests; with `spread`, request i asks for max_tokens + (i * 37) % spread tokens."""
    with open(path, "w") as f:
        for i in range(n):
            q = f"Tell me one fact about {TOPICS[i % len(TOPICS)]} (question {i})."
            tokens = max_tokens + ((i * 37) % spread if spread else 0)
            body = {"messages": [{"role": "user", "content": q}], "max_tokens": tokens, "temperature": 0}
            f.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                                "body": body}) + "\n")
    return path


def outputs(path: Path) -> dict[str, dict]:
    return {r["custom_id"]: r for r in map(json.loads, path.read_text().splitlines())}


ENGINE = EngineConfig(dtype="float32", device="cpu", kv_cache_gib=0.25)


def serve(tmp_path: Path, name: str, cluster: ClusterConfig, on_tick=None, stall_timeout_s: float = 60.0,
          call_timeout_s: float = 120.0):
    out = tmp_path / f"{name}.jsonl"
    summary = run_batch(write_batch(tmp_path / "in.jsonl"), out, ENGINE, cluster,
                        RouterConfig(max_prefill_tokens=512, stall_timeout_s=stall_timeout_s,
                                     call_timeout_s=call_timeout_s),
                        BatchOptions(progress=False), on_tick=on_tick)
    return summary, outputs(out)


@pytest.fixture(scope="module")
def reference(ray_cluster, tmp_path_factory):
    summary, recs = serve(tmp_path_factory.mktemp("ref"), "ref", ClusterConfig())
    assert summary.succeeded == 64 and summary.kv_blocks_leaked == 0
    return {cid: r["pdserve"]["output_token_ids"] for cid, r in recs.items()}


def check_complete(summary, recs, reference):
    assert summary.failed == 0 and summary.succeeded == 64, summary.render()
    assert set(recs) == set(reference)
    for cid, ref in reference.items():
        assert recs[cid]["error"] is None
        assert recs[cid]["pdserve"]["output_token_ids"] == ref, f"{cid} differs after the fault"
    assert summary.kv_blocks_leaked == 0, "the decode side must end with every KV block free"


class KillOnce:
    """on_tick hook: kill a worker once the batch is under way."""

    def __init__(self, role: str, when) -> None:
        self.role, self.when, self.done, self.pid = role, when, False, None

    def __call__(self, router) -> None:
        if self.done or not self.when(router):
            return
        self.done = True
        handle = next(iter(getattr(router.workers, self.role).values()))
        self.pid = ray.get(handle.where.remote()).pid
        ray.kill(handle, no_restart=False)  # Ray restarts it (max_restarts)


def decoding(router) -> bool:
    return sum(r.state == State.DECODE for r in router.active.values()) >= 8


def prefilling(router) -> bool:
    """A prefill batch is in flight and an earlier one has already come back."""
    in_flight = any(c.kind == CallKind.PREFILL for c in router._calls.values())
    return in_flight and any(r.state in (State.ADMITTING, State.DECODE) for r in router.active.values())


def test_decode_worker_killed_mid_batch(ray_cluster, tmp_path, reference):
    kill = KillOnce("decode", decoding)
    summary, recs = serve(tmp_path, "kill-decode", ClusterConfig(), on_tick=kill)
    assert kill.done
    check_complete(summary, recs, reference)
    retried = [r for r in recs.values() if r["pdserve"]["attempts"] > 1]
    assert retried and all("decode worker" in r["pdserve"]["retried_after"][0] for r in retried)
    # The killed worker never closed its shared-memory pool; its replacement swept it.
    assert not list(SHM_DIR.glob(f"{SEGMENT_PREFIX}{kill.pid}-*")), "the dead worker's KV pool is still in RAM"


def test_prefill_worker_killed_mid_batch(ray_cluster, tmp_path, reference):
    kill = KillOnce("prefill", prefilling)
    summary, recs = serve(tmp_path, "kill-prefill", ClusterConfig(), on_tick=kill)
    assert kill.done
    check_complete(summary, recs, reference)
    assert any("prefill worker" in e for r in recs.values() for e in r["pdserve"]["retried_after"])


class WedgeOnce:
    """on_tick hook: wedge a worker once the batch is under way, and note its process."""

    def __init__(self, role: str, how: str, when) -> None:
        self.role, self.how, self.when, self.pid = role, how, when, None

    def __call__(self, router) -> None:
        if self.pid is not None or not self.when(router):
            return
        handle = next(iter(getattr(router.workers, self.role).values()))
        self.pid = ray.get(handle.where.remote()).pid
        if self.how == "sigstop":  # the whole process freezes: its calls go unanswered
            os.kill(self.pid, signal.SIGSTOP)
        else:  # the actor answers calls, but its decode loop no longer turns
            ray.get(handle.stall_for.remote(3600))


@pytest.mark.parametrize("role,how,expected", [
    ("decode", "sigstop", "CallTimeout: poll call"),
    ("decode", "stalled_loop", "DecodeStalled"),
    ("prefill", "sigstop", "CallTimeout: prefill call"),
])
def test_wedged_worker_is_restarted(ray_cluster, tmp_path, reference, role, how, expected):
    wedge = WedgeOnce(role, how, decoding if role == "decode" else prefilling)
    try:
        summary, recs = serve(tmp_path, f"wedged-{role}-{how}", ClusterConfig(), on_tick=wedge,
                              stall_timeout_s=5, call_timeout_s=15)
    finally:
        if wedge.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(wedge.pid, signal.SIGKILL)  # never leave a frozen process behind
    assert wedge.pid is not None
    check_complete(summary, recs, reference)
    reasons = [e for r in recs.values() for e in r["pdserve"]["retried_after"]]
    assert reasons and all(expected in e for e in reasons), reasons[:3]
    # The wedged process could finish nothing after the wedge, so the batch completed on its replacement.


def test_transfer_failures_are_retried(ray_cluster, tmp_path, reference):
    summary, recs = serve(tmp_path, "bad-transfer", ClusterConfig(transport="grpc", inject_transfer_failures=5))
    check_complete(summary, recs, reference)
    retried = [r for r in recs.values() if r["pdserve"]["attempts"] > 1]
    assert len(retried) == 5
    assert all(r["pdserve"]["retried_after"][0].startswith("TransferError") for r in retried)


def test_retries_are_bounded_with_a_typed_reason(ray_cluster, tmp_path):
    out = tmp_path / "doomed.jsonl"
    summary = run_batch(write_batch(tmp_path / "in.jsonl", n=2), out, ENGINE,
                        ClusterConfig(transport="grpc", inject_transfer_failures=100),
                        RouterConfig(max_attempts=3), BatchOptions(progress=False))
    assert summary.failed == 2 and summary.kv_blocks_leaked == 0
    for rec in outputs(out).values():
        assert rec["error"]["code"] == "request_failed"
        assert "gave up after 3 attempts" in rec["error"]["message"]
        assert "TransferError" in rec["error"]["message"]
        assert len(rec["pdserve"]["retried_after"]) == 3
