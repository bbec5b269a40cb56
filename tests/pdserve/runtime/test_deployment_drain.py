"""`pdserve down` drains a deployment as SIGTERM drains a server: requests in flight finish within the
timeout or come back failed with a clear reason, new ones fail at once, and no KV block stays held."""

from __future__ import annotations

import threading
import time

import pytest
import ray

from engine.config import EngineConfig, SamplingParams
from pdserve.runtime.backend import leaked_blocks
from pdserve.runtime.cluster import ClusterConfig
from pdserve.runtime.deployment import DeploymentSpec, RemoteRouter, deploy, find, teardown
from router.request import Request, State
from router.router import RouterConfig

pytestmark = pytest.mark.slow

NAME = "draintest"


def _req(i: int, max_tokens: int) -> Request:
    return Request(f"r{i}", f"c{i}", i, "completion", [(i * 7 + k) % 250 + 1 for k in range(12)],
                   SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))


def test_down_drains_the_requests_in_flight(ray_cluster, tiny_with_tokenizer):
    engine = EngineConfig(model=str(tiny_with_tokenizer), dtype="float32", device="cpu", kv_cache_gib=0.05,
                          num_threads=1)
    deploy(DeploymentSpec(NAME, engine, ClusterConfig(), RouterConfig(max_prefill_tokens=256)), address=None)
    actor = find(NAME, None)
    try:
        finished: dict[str, Request] = {}
        client = RemoteRouter(actor, on_finished=lambda r: finished.setdefault(r.custom_id, r))
        for i in range(8):
            client.submit(_req(i, 4 if i % 2 else 480))  # short ones finish at once, long ones are held (below)
        deadline = time.time() + 120
        while len(finished) < 4 and time.time() < deadline:  # the short ones are done: the long ones decode
            client.tick(0.1)
        # The long ones must still be in flight when the 0.5 s timeout ends, whatever this CPU's speed: the
        # decode loops pause for 5 s (the fault drill; well inside the router's 60 s stall watchdog).
        ray.get([h.stall_for.remote(5.0) for h in client.workers.decode.values()])
        drained: dict = {}
        drainer = threading.Thread(target=lambda: drained.update(ray.get(actor.drain.remote(0.5))))
        drainer.start()
        time.sleep(0.2)
        client.submit(_req(99, 4))  # arrives while draining
        while (drainer.is_alive() or not client.done) and time.time() < deadline:
            client.tick(0.1)
        drainer.join()
        assert len(finished) == 9
        assert all(finished[f"c{i}"].state == State.DONE for i in (1, 3, 5, 7))
        for cid in ("c0", "c2", "c4", "c6", "c99"):
            assert finished[cid].state == State.FAILED and "shutting down" in finished[cid].error, cid
        assert drained["aborted"] == 4
        while leaked_blocks(client.workers) and time.time() < deadline:  # aborts free blocks between steps
            time.sleep(0.2)
        assert leaked_blocks(client.workers) == 0
    finally:
        teardown(NAME, None, shutdown_timeout_s=1)
