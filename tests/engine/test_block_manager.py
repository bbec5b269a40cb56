"""BlockManager: allocation, freeing, exhaustion; every test ends with a leak check."""

from __future__ import annotations

import pytest

from engine.kv_cache import BlockManager, KVLayout, KVPool, OutOfBlocks


def test_allocate_rounds_up_to_blocks_and_tables_are_disjoint():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = bm.allocate("a", 5)  # 2 blocks
    b = bm.allocate("b", 8)  # 2 blocks
    c = bm.allocate("c", 1)  # 1 block
    assert (len(a), len(b), len(c)) == (2, 2, 1)
    assert not set(a) & set(b) and not set(a) & set(c) and not set(b) & set(c)
    assert bm.num_free == 5 and bm.num_used == 5
    assert bm.table("b") == b
    for rid in "abc":
        bm.free(rid)
    bm.assert_empty()


def test_exhaustion_is_refused_and_leaves_state_unchanged():
    bm = BlockManager(num_blocks=4, block_size=16)
    bm.allocate("a", 48)
    assert bm.can_allocate(16) and not bm.can_allocate(17)
    with pytest.raises(OutOfBlocks):
        bm.allocate("b", 17)
    assert bm.num_free == 1 and not bm.holds("b")
    bm.free("a")
    assert bm.can_allocate(64)
    bm.allocate("b", 64)
    bm.free("b")
    bm.assert_empty()


def test_freed_blocks_are_reused_and_double_free_is_harmless():
    bm = BlockManager(num_blocks=3, block_size=2)
    first = bm.allocate("a", 6)
    assert bm.free("a") == 3
    assert bm.free("a") == 0
    again = bm.allocate("b", 6)
    assert sorted(again) == sorted(first)
    with pytest.raises(ValueError):
        bm.allocate("b", 2)  # one table per request
    bm.free("b")
    bm.assert_empty()


def test_leak_check_catches_a_leak():
    bm = BlockManager(num_blocks=2, block_size=2)
    bm.allocate("a", 1)
    with pytest.raises(AssertionError, match="leak"):
        bm.assert_empty()
    bm.free("a")
    bm.assert_empty()


def test_pool_layout_and_block_round_trip():
    import torch

    layout = KVLayout(num_layers=3, num_blocks=8, block_size=4, num_kv_heads=2, head_dim=8, dtype="bfloat16")
    assert layout.nbytes == 3 * 2 * 8 * 4 * 2 * 8 * 2
    pool = KVPool.allocate(layout)
    k = torch.randn(2, 4, 2, 8).to(torch.bfloat16)
    v = torch.randn(2, 4, 2, 8).to(torch.bfloat16)
    ids = torch.tensor([5, 1])
    pool.write_blocks(1, ids, k, v)
    rk, rv = pool.read_blocks(1, ids)
    assert torch.equal(rk, k) and torch.equal(rv, v)
    assert pool.tensor[0].abs().sum() == 0 and pool.tensor[2].abs().sum() == 0  # other layers untouched
    other = KVLayout(3, 8, 16, 2, 8, "bfloat16")
    assert "block_size" in layout.compatible_with(other)
    assert layout.compatible_with(KVLayout(3, 99, 4, 2, 8, "bfloat16")) is None  # pool size may differ


def test_block_runs_cover_every_token_exactly_once():
    import random

    from engine.kv_cache import block_runs

    rng = random.Random(0)
    for _ in range(200):
        bs = rng.choice([1, 4, 16])
        n_blocks = rng.randint(1, 12)
        ids = list(range(40))
        rng.shuffle(ids)
        table = sorted(ids[:n_blocks]) if rng.random() < 0.5 else ids[:n_blocks]
        first = rng.randint(0, n_blocks - 1)
        tokens = rng.randint(1, (n_blocks - first) * bs)
        expected = [table[first + p // bs] * bs + p % bs for p in range(tokens)]
        got = []
        for dst, src, length in block_runs(table, bs, tokens, first_block=first):
            assert src == len(got)
            got += list(range(dst, dst + length))
        assert got == expected


def test_a_fresh_pool_hands_out_ascending_runs_and_reuses_freed_blocks_first():
    from engine.kv_cache import block_runs

    bm = BlockManager(num_blocks=100, block_size=16)
    a = bm.allocate("a", 100)
    assert a == list(range(7)) and len(block_runs(a, 16, 100)) == 1
    bm.allocate("b", 40)
    bm.free("a")
    c = bm.allocate("c", 64)  # the blocks "a" just released, in order
    assert c == list(range(4))
    bm.free("b")
    bm.free("c")
    bm.assert_empty()
