"""LengthBucketQueue: bucketing, ordering, priority, aging, constrained_get."""

from __future__ import annotations

from router.queue import LengthBucketQueue


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def make(edges=(16, 64, 256), aging_s=10.0):
    clock = FakeClock()
    return LengthBucketQueue(edges, aging_s=aging_s, clock=clock), clock


def test_bucketing_by_length():
    q, _ = make()
    assert [q.bucket_of(n) for n in (0, 15, 16, 63, 64, 255, 256, 10_000)] == [0, 0, 1, 1, 2, 2, 3, 3]
    for name, n in [("a", 10), ("b", 20), ("c", 30), ("d", 300)]:
        q.put(name, n)
    assert q.depth_by_bucket() == {"0-15": 1, "16-63": 2, "64-255": 0, "256+": 1}
    assert len(q) == 4


def test_a_batch_comes_from_one_bucket_in_arrival_order():
    q, _ = make()
    for name, n in [("s1", 5), ("m1", 20), ("s2", 6), ("m2", 30), ("s3", 7)]:
        q.put(name, n)
    assert q.constrained_get() == ["s1", "s2", "s3"]  # oldest head first: the short bucket
    assert q.constrained_get() == ["m1", "m2"]
    assert q.constrained_get() == [] and len(q) == 0


def test_priority_orders_within_and_across_buckets():
    q, _ = make()
    q.put("low-short", 5, priority=5)
    q.put("high-long", 100, priority=0)
    q.put("mid-short", 6, priority=1)
    assert q.constrained_get() == ["high-long"]
    assert q.constrained_get() == ["mid-short", "low-short"]


def test_token_budget_and_max_items():
    q, _ = make()
    for i in range(5):
        q.put(f"r{i}", 40)  # all in bucket 16-63
    assert q.constrained_get(token_budget=100) == ["r0", "r1"]
    assert q.constrained_get(max_items=1) == ["r2"]
    q.put("huge", 1000)
    # A single request beyond the budget is still served, alone.
    assert q.constrained_get(token_budget=100) == ["r3", "r4"]
    assert q.constrained_get(token_budget=100) == ["huge"]
    assert len(q) == 0


def test_condition_stops_the_batch_and_keeps_the_item_in_place():
    q, _ = make()
    for i in range(4):
        q.put(i, 10)
    room = [2]

    def fits(item):
        if room[0] == 0:
            return False
        room[0] -= 1
        return True

    assert q.constrained_get(fits) == [0, 1]
    assert q.constrained_get(fits) == []  # nothing fits: nothing taken
    room[0] = 5
    assert q.constrained_get(fits) == [2, 3]


def test_aging_lets_a_low_priority_bucket_win_eventually():
    q, clock = make(aging_s=10.0)
    q.put("old-low", 5, priority=3)
    clock.t = 25.0  # waited 25 s: aged score 3 - 2.5 = 0.5
    q.put("new-high", 100, priority=1)  # score 1
    assert q.constrained_get() == ["old-low"]
    assert q.constrained_get() == ["new-high"]


def test_without_enough_age_priority_wins():
    q, clock = make(aging_s=10.0)
    q.put("old-low", 5, priority=3)
    clock.t = 5.0  # aged score 2.5
    q.put("new-high", 100, priority=1)
    assert q.constrained_get() == ["new-high"]


def test_remove_if():
    q, _ = make()
    for i in range(6):
        q.put(i, 10 * i)
    assert sorted(q.remove_if(lambda x: x % 2 == 0)) == [0, 2, 4]
    assert len(q) == 3
    got = []
    while len(q):
        got += q.constrained_get()
    assert sorted(got) == [1, 3, 5]


def test_tiebreak_orders_equals_within_and_across_buckets():
    q, _ = make()
    q.put("short-out", 5, tiebreak=-10)
    q.put("long-out", 6, tiebreak=-200)
    q.put("mid-bucket-longest", 40, tiebreak=-500)
    assert q.constrained_get() == ["mid-bucket-longest"]
    assert q.constrained_get() == ["long-out", "short-out"]
