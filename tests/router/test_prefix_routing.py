"""KV-aware routing: the router's index of cached blocks, and the cost that weighs overlap against load."""

from __future__ import annotations

from engine.kv_cache import BlockManager
from engine.prefix_cache import KVEvents
from router.kv_index import KVIndex
from router.placement import DecodeCapacity, Placement, PrefixRouting

BS = 4
SALT = "model"


def _events_after(bm: BlockManager, rid: str, prompt: list[int]) -> KVEvents:
    bm.allocate(rid, len(prompt), prompt)
    bm.register(rid, prompt)
    bm.free(rid)
    return bm.take_events()


def test_index_follows_stored_and_evicted_blocks_and_counts_leading_overlap():
    bm = BlockManager(4, BS, enable_prefix_caching=True, salt=SALT)
    index = KVIndex(BS, SALT)
    header = list(range(8))
    index.apply("w0", _events_after(bm, "a", header + [1, 2, 3, 4]))  # three full blocks keyed
    assert index.overlaps(index.keys(header + [1, 2, 3, 4, 9])) == {"w0": 3}
    assert index.overlaps(index.keys(header + [7, 7, 7, 7])) == {"w0": 2}
    assert index.overlaps(index.keys([5] + header)) == {}
    bm.allocate("big", 4 * BS)  # evicts every cached block
    bm.free("big")
    index.apply("w0", bm.take_events())
    assert index.overlaps(index.keys(header)) == {} and index.held("w0") == 0
    bm.assert_empty()


def test_overlap_is_per_worker_and_a_lost_worker_leaves_the_index():
    index = KVIndex(BS, SALT)
    keys = index.keys(list(range(16)))
    index.apply("w0", KVEvents(stored=keys[:4]))
    index.apply("w1", KVEvents(stored=keys[:2]))
    assert index.overlaps(keys) == {"w0": 4, "w1": 2}
    assert index.remove_worker("w0") == 4
    assert index.overlaps(keys) == {"w1": 2} and index.held("w0") == 0


def test_requests_sharing_a_header_go_where_it_is_cached_until_that_worker_is_too_busy():
    routing = PrefixRouting()
    routing.configure(BS, SALT)
    header = list(range(40))  # 10 blocks
    keys = routing.keys(header + [99])
    routing.prefill_index.apply("p1", KVEvents(stored=keys[:10]))
    assert routing.prefill_worker(["p0", "p1"], keys, 41) == "p1"
    routing.prefill_sent("p1", "a#0", keys, 41)  # 1 block to compute: p1 stays cheaper
    assert routing.prefill_worker(["p0", "p1"], keys, 41) == "p1"
    for i in range(12):  # p1 piles up work; past the header's worth of blocks, p0 wins
        routing.prefill_sent("p1", f"x{i}#0", routing.keys([1000 + i] * 4), 4)
    assert routing.prefill_worker(["p0", "p1"], keys, 41) == "p0"
    routing.prefill_done("p1", [f"x{i}#0" for i in range(12)])
    assert routing.prefill_worker(["p0", "p1"], keys, 41) == "p1"
    routing.worker_lost("p1")  # its cache and its work are gone
    assert routing.prefill_index.overlaps(keys) == {}
    assert routing.prefill_worker(["p0", "p1"], keys, 41) == "p0"
    assert routing.prefill_worker([], keys, 41) is None


def test_decode_placement_weighs_cached_blocks_against_free_blocks():
    placement = Placement()
    placement.add_worker(DecodeCapacity("d0", 100, BS, 8))
    placement.add_worker(DecodeCapacity("d1", 100, BS, 8))
    placement.workers["d1"].holds["other"] = 5  # d1 is a little busier...
    assert placement.place("a", 48, {"d1": 10}) == "d1"  # ...but holds 10 of the prompt's blocks
    assert placement.place("b", 48) == "d0"  # no overlap: most free blocks, as before
    placement.release("d1", "a")
    placement.release("d0", "b")


def test_router_drops_a_dead_workers_entries_from_both_indexes():
    """The router's own fault path (a failed call marks the worker lost): no routing to a stale cache."""
    from engine.kv_cache import KVLayout
    from proto.messages import KVEndpoint
    from proto.workers import WorkerSet
    from router.calls import Role
    from router.router import Router, RouterConfig

    layout = KVLayout(2, 64, BS, 1, 8, "float32")
    endpoints = {d: KVEndpoint(d, "n", layout, SALT) for d in ("d0", "d1")}
    router = Router(WorkerSet(prefill={"p0": object(), "p1": object()}, decode={"d0": object(), "d1": object()},
                              endpoints=endpoints), RouterConfig(), on_finished=lambda _: None)
    keys = router.routing.keys(list(range(12)))
    for w in ("p0", "p1"):
        router.routing.prefill_index.apply(w, KVEvents(stored=keys))
    for w in ("d0", "d1"):
        router.routing.decode_index.apply(w, KVEvents(stored=keys))
    router.worker_lost(Role.PREFILL, "p0", "prefill worker p0 failed: died")
    router.worker_lost(Role.DECODE, "d1", "decode worker d1 failed: died")
    assert router.routing.prefill_index.overlaps(keys) == {"p1": 3}
    assert router.routing.decode_index.overlaps(keys) == {"d0": 3}
    router._retire(Role.DECODE, "d0", "gone")
    assert router.routing.decode_index.overlaps(keys) == {}
