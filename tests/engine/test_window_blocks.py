"""BlockManager and the router's mirror with sliding windows: skipped prompt blocks, blocks freed behind
the window, prefix sharing past a skip, the mirror's arithmetic; every test ends with a leak check."""

from __future__ import annotations

from engine.kv_cache import BlockManager
from engine.kv_window import NO_BLOCK, blocks_before_window, reserved_blocks
from router.placement import DecodeCapacity, Placement


def test_blocks_before_window_is_the_definition():
    # A query at p sees keys p - W < j <= p: block b (positions 4b..4b+3) is dead once 4b + 3 < p - W + 1.
    for w in (1, 5, 16):
        for p in range(0, 60):
            dead = [b for b in range(p // 4 + 1) if 4 * b + 3 < p - w + 1]
            assert blocks_before_window(p, w, 4) == len(dead), (p, w)
    assert blocks_before_window(1000, None, 4) == 0
    assert reserved_blocks(70, 24, 16, 4) == 24 - 13 and reserved_blocks(70, 24, None, 4) == 24


def test_skip_release_and_free_leave_nothing_behind():
    bm = BlockManager(32, 4)
    table = bm.allocate("a", 70 + 24, skip=13)
    assert table[:13] == [NO_BLOCK] * 13 and NO_BLOCK not in table[13:] and len(table) == 24
    assert bm.num_used == 11
    assert bm.release_before("a", 15) == 2 and table[:15] == [NO_BLOCK] * 15
    assert bm.release_before("a", 15) == 0  # already gone
    assert bm.num_used == 9 and bm.take_released() == {"a": 2} and bm.take_released() == {}
    assert bm.free("a") == 9
    bm.assert_empty()


def test_can_allocate_counts_only_held_blocks():
    bm = BlockManager(11, 4)
    assert bm.can_allocate(94, skip=13) and not bm.can_allocate(94, skip=12)
    bm.allocate("a", 94, skip=13)
    assert bm.num_free == 0
    bm.free("a")
    bm.assert_empty()


def test_a_released_prompt_block_stays_cached_and_is_shared_past_a_skip():
    """Request a's prompt is keyed, then the window leaves its first blocks behind: they turn evictable with
    their keys (their KV is intact). b, same prompt, shares from past its own skip; c shares all of it."""
    bm = BlockManager(64, 4, enable_prefix_caching=True)
    prompt = list(range(40))
    a = list(bm.allocate("a", 40 + 8, prompt, max_shared=9))
    assert bm.register("a", prompt) == 10
    bm.release_before("a", 4)
    assert bm.num_cached == 10  # released blocks keep their keys: evictable, not lost
    b = bm.allocate("b", 40 + 8, prompt, max_shared=9, skip=6)
    assert b[:6] == [NO_BLOCK] * 6 and b[6:9] == a[6:9]  # keys name the whole prefix: a run may start past 0
    assert bm.shared_blocks("b") == 3  # up to block max_shared = 9 (one prompt block always travels)
    c = bm.allocate("c", 40 + 8, prompt, max_shared=9)
    assert c[:9] == a[:9] and bm.shared_blocks("c") == 9
    for rid in ("a", "b", "c"):
        bm.free(rid)
    bm.assert_empty()


def test_register_skips_blocks_the_request_no_longer_holds():
    bm = BlockManager(64, 4, enable_prefix_caching=True)
    prompt = list(range(100, 140))
    bm.allocate("a", 48, prompt, skip=5)
    assert bm.register("a", prompt) == 5  # blocks 5..9: the skipped ones have nothing to key
    bm.free("a")
    bm.assert_empty()


def test_the_mirror_reserves_less_and_shrinks_with_reports():
    placement = Placement()
    placement.add_worker(DecodeCapacity("d0", num_blocks=30, block_size=4, max_num_seqs=8, kv_window=16))
    assert placement.place("x", 70 + 24, prompt_tokens=70) == "d0"
    assert placement.workers["d0"].holds["x"] == 11
    assert placement.place("y", 70 + 24, prompt_tokens=70) == "d0"
    assert placement.place("z", 70 + 24, prompt_tokens=70) is None  # 22 held, 11 more do not fit in 30
    placement.shrink("d0", (("x", 4), ("gone", 3)))
    assert placement.workers["d0"].holds["x"] == 7
    assert placement.place("z", 70 + 24, prompt_tokens=70) == "d0"
    for a in ("x", "y", "z"):
        placement.release("d0", a)
    assert placement.held_blocks() == 0
    # Without a window (or colocated: no prompt_tokens) the whole prompt + max_tokens is reserved.
    full = Placement()
    full.add_worker(DecodeCapacity("d1", num_blocks=30, block_size=4, max_num_seqs=8))
    assert full.place("x", 70 + 24, prompt_tokens=70) == "d1" and full.workers["d1"].holds["x"] == 24
