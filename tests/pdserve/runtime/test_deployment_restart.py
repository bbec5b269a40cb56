"""A deployment's router actor killed while it serves: Ray restarts it, it re-attaches the same workers
(freeing what the old router held), and its client resubmits what it had not received."""

from __future__ import annotations

import random
import time

import pytest
import ray

from engine.config import EngineConfig, SamplingParams
from pdserve.runtime.backend import leaked_blocks
from pdserve.runtime.cluster import ClusterConfig
from pdserve.runtime.deployment import DeploymentSpec, RemoteRouter, deploy, teardown
from proto.messages import Reservation
from router.request import Request, State

pytestmark = pytest.mark.slow

NAME = "restarttest"
PARAMS = SamplingParams(max_tokens=300, temperature=0, ignore_eos=True)



def _requests() -> list[Request]:
    rng = random.Random(0)
    return [Request(f"r{i}", f"c{i}", i + 1, "completion", [rng.randrange(256) for _ in range(rng.randrange(5, 40))],
                    PARAMS) for i in range(6)]


def _serve(actor, kill_after_first_token: bool = False, restart: bool = True, timeout_s: float = 150.0):
    """Run the requests through a client of the deployment; optionally kill the router once decode streams
    (`restart`: Ray restarts it; else it is gone for good and the client gives up on it after 5 s)."""
    finished: dict[str, Request] = {}
    streamed: dict[str, list[int]] = {}
    killed = {"in_flight": 0}

    def on_tokens(req: Request, new: list[int]) -> None:
        streamed.setdefault(req.custom_id, []).extend(new)

    client = RemoteRouter(actor, on_finished=lambda r: finished.__setitem__(r.custom_id, r), on_tokens=on_tokens,
                          restart_timeout_s=120 if restart else 5)
    for req in _requests():
        client.submit(req)
    deadline = time.time() + timeout_s
    while not client.done and time.time() < deadline:
        client.tick(0.2)
        if kill_after_first_token and not killed["in_flight"] and streamed:
            # As if the router had just reserved blocks for a prefill it never got to send: only the
            # restarted router's clean-up can free them.
            ghost = Reservation("ghost#0", 8, 8, tuple(range(8)))
            assert ray.get(client.workers.decode["decode-0"].reserve.remote([ghost]), timeout=60)
            killed["in_flight"] = len(client.active)
            ray.kill(actor, no_restart=not restart)
    assert client.done, f"requests still in flight after {timeout_s:.0f}s: {sorted(client.active)}"
    return client, finished, streamed, killed["in_flight"]


def _pids(actor) -> dict[str, int]:
    return {w["worker_id"]: w["pid"] for w in ray.get(actor.status.remote(), timeout=120)["workers"]}


def test_killed_router_restarts_reattaches_and_requeues(ray_cluster, tiny_with_tokenizer):
    engine = EngineConfig(model=str(tiny_with_tokenizer), dtype="float32", device="cpu", kv_cache_gib=0.01,
                          attention_backend="torch")
    actor = deploy(DeploymentSpec(NAME, engine, ClusterConfig()), address=None)
    try:
        _, reference, _, _ = _serve(actor)
        assert all(r.state == State.DONE for r in reference.values()), [r.error for r in reference.values()]
        pids = _pids(actor)

        client, finished, streamed, in_flight = _serve(actor, kill_after_first_token=True)
        assert in_flight > 0, "the router was killed with nothing in flight: the drill proves nothing"
        assert client.restarts == 1
        status = ray.get(actor.status.remote(), timeout=120)
        assert status["reattached"] and _pids(actor) == pids, "the restarted router started new workers"
        assert set(finished) == set(reference)
        for cid, req in finished.items():  # the router came back in time: every request completes
            assert req.state == State.DONE, req.error
            assert req.output_token_ids == reference[cid].output_token_ids, cid
            assert streamed[cid] == req.output_token_ids, f"{cid}: tokens streamed twice or lost across the restart"
        resubmitted = [r for r in finished.values() if any("RouterRestarted" in e for e in r.errors)]
        assert len(resubmitted) == in_flight

        deadline = time.time() + 30
        while leaked_blocks(client.workers) and time.time() < deadline:
            time.sleep(0.2)
        assert leaked_blocks(client.workers) == 0
        stats = ray.get([h.stats.remote() for h in client.workers.decode.values()], timeout=60)
        assert all(s.pool.reserved_requests == 0 and s.running == 0 for s in stats), stats

        # A router that does not come back: every request fails with a clear error, none hangs.
        client, finished, _, in_flight = _serve(actor, kill_after_first_token=True, restart=False)
        assert in_flight > 0 and set(finished) == set(reference)
        assert all(r.state == State.FAILED and r.error.startswith("RouterLost") for r in finished.values()), \
            [r.error for r in finished.values()]
    finally:
        teardown(NAME, None)  # a router gone for good: its orphaned workers are removed
    assert not [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(NAME)]
