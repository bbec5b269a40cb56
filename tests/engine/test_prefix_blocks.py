"""Hash-chained, ref-counted blocks: sharing, eviction under pressure, and the leak check."""

from __future__ import annotations

import random

import pytest

from engine.kv_cache import BlockManager, OutOfBlocks
from engine.prefix_cache import block_keys

BS = 4


def _bm(num_blocks: int) -> BlockManager:
    return BlockManager(num_blocks, BS, enable_prefix_caching=True, salt="model-a")


def test_keys_chain_over_the_whole_prefix_and_the_salt():
    a = block_keys(list(range(12)), BS, "m")
    assert len(a) == 3 and len(set(a)) == 3
    assert block_keys(list(range(11)), BS, "m") == a[:2]  # a partial block has no key
    changed = block_keys([99] + list(range(1, 12)), BS, "m")
    assert all(x != y for x, y in zip(a, changed))  # one token early changes every later key
    assert block_keys(list(range(12)), BS, "other model") != a


def test_a_shared_prefix_is_allocated_once_and_ref_counted():
    bm = _bm(16)
    header = list(range(100, 108))  # two full blocks
    a = bm.allocate("a", 11, header + [1, 2, 3])
    assert bm.match_prefix(header) == []  # nothing is shared before its KV is registered
    assert bm.register("a", header + [1, 2, 3]) == 2  # the partial third block stays private
    b = bm.allocate("b", 12, header + [7, 8, 9, 10])
    assert b[:2] == a[:2] and not set(b[2:]) & set(a)
    assert bm.shared_blocks("b") == 2 and bm.shared_blocks("a") == 0
    assert bm.num_used == 3 + 1  # shared blocks counted once
    bm.free("a")
    assert bm.num_used == 3  # b still references the header
    bm.free("b")
    assert bm.num_free == 16 and bm.num_cached == 2  # cached, unreferenced: free but kept
    c = bm.allocate("c", 9, header + [5])
    assert c[:2] == a[:2]
    bm.free("c")
    bm.assert_empty()


def test_can_allocate_counts_only_missing_blocks():
    bm = _bm(4)
    header = list(range(8))
    bm.allocate("a", 8, header)
    bm.register("a", header)
    bm.allocate("x", 8)  # the other two blocks
    assert bm.num_free == 0
    assert not bm.can_allocate(9, header + [1])  # needs one new block, none free
    assert bm.can_allocate(8, header)  # wholly cached
    bm.allocate("b", 8, header)
    with pytest.raises(OutOfBlocks):
        bm.allocate("c", 9, header + [1])
    for rid in ("a", "x", "b"):
        bm.free(rid)
    bm.assert_empty()


def test_max_shared_caps_the_match():
    bm = _bm(8)
    header = list(range(8))
    bm.allocate("a", 8, header)
    bm.register("a", header)
    bm.free("a")
    assert len(bm.match_prefix(header)) == 2
    bm.allocate("b", 8, header, max_shared=(8 - 1) // BS)  # keep at least one token to compute
    assert bm.shared_blocks("b") == 1
    bm.free("b")
    bm.assert_empty()


def test_eviction_under_pressure_takes_least_recent_unreferenced_blocks_only():
    bm = _bm(6)
    p1, p2 = list(range(8)), list(range(50, 58))
    t1 = bm.allocate("p1", 8, p1)
    bm.register("p1", p1)
    bm.free("p1")  # evictable, least recent
    t2 = bm.allocate("p2", 8, p2)
    bm.register("p2", p2)
    bm.free("p2")
    bm.take_events()
    held = bm.allocate("held", 8, p2)  # p2 referenced again: not evictable
    assert held == t2
    big = bm.allocate("big", 16)  # 4 blocks: the 2 truly free ones, then p1's evicted blocks
    assert set(t1) <= set(big) and not set(t2) & set(big)
    assert bm.match_prefix(p1) == [] and bm.match_prefix(p2) == t2
    events = bm.take_events()
    assert len(events.removed) == 2 and not events.stored
    assert not bm.can_allocate(1)  # every block referenced
    bm.free("big")
    bm.free("held")
    bm.assert_empty()


def test_random_workload_on_a_pool_smaller_than_its_working_set():
    """Many requests over a few shared headers through a tiny pool: a referenced block is never
    handed out twice, cached blocks always hold the tokens their key names, and nothing leaks."""
    rng = random.Random(0)
    bm = _bm(24)
    headers = [[rng.randrange(1000) for _ in range(rng.choice([4, 8, 12]))] for _ in range(5)]
    content: dict[int, tuple[int, ...]] = {}  # block -> tokens written in it (what the KV would be)
    live: dict[str, list[int]] = {}
    hits = 0
    for i in range(400):
        if live and (rng.random() < 0.45 or not bm.can_allocate(16)):
            rid = rng.choice(sorted(live))
            bm.register(rid, live.pop(rid))  # at finish, as the decode worker may
            bm.free(rid)
            continue
        prompt = rng.choice(headers) + [rng.randrange(1000) for _ in range(rng.randrange(1, 9))]
        if not bm.can_allocate(len(prompt), prompt):
            continue
        shared = len(bm.match_prefix(prompt))
        table = bm.allocate(f"r{i}", len(prompt), prompt)
        hits += shared
        referenced_elsewhere = {b for t in (bm.table(r) for r in live) for b in t}
        assert not set(table[shared:]) & referenced_elsewhere
        for j, b in enumerate(table[:shared]):
            assert content[b] == tuple(prompt[j * BS:(j + 1) * BS])
        for j, b in enumerate(table[shared:], start=shared):
            content[b] = tuple(prompt[j * BS:(j + 1) * BS])
        bm.register(f"r{i}", prompt)
        live[f"r{i}"] = prompt
    assert hits > 50  # the headers were reused
    assert len(bm.take_events().removed) > 10  # and cached blocks were evicted to make room
    for rid in list(live):
        bm.free(rid)
    bm.assert_empty()


def test_leak_check_sees_a_leftover_reference():
    bm = _bm(4)
    bm.allocate("a", 4, [1, 2, 3, 4])
    bm.register("a", [1, 2, 3, 4])
    with pytest.raises(AssertionError, match="leak"):
        bm.assert_empty()
    bm.free("a")
    bm.assert_empty()  # cached but unreferenced counts as free


def test_caching_off_shares_nothing():
    bm = BlockManager(8, BS)
    bm.allocate("a", 8, list(range(8)))
    assert bm.register("a", list(range(8))) == 0
    bm.allocate("b", 8, list(range(8)))
    assert bm.shared_blocks("b") == 0 and bm.num_used == 4
    bm.free("a")
    bm.free("b")
    bm.assert_empty()
