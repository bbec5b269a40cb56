"""A priority queue of requests in length buckets, with `constrained_get` (homework 3.2).

Prompts are bucketed by token length (edges like 64, 128, 256, ...), so a
prefill batch holds similar lengths. Within a bucket, items leave in
(priority, tiebreak, arrival) order; lower values go first. The router uses
tiebreak = -max_tokens: among equals, the longest decode starts first, which
shortens the tail of an offline batch (longest-processing-time first).

Which bucket serves next: the one whose head has the best *aged* priority,
    score = priority - waited_seconds / aging_s
so a bucket whose head has waited long enough wins over any other, and no
bucket starves. Ties go by the heads' tiebreak, then to the oldest head.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")

DEFAULT_BUCKET_EDGES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


@dataclass(order=True)
class _Entry(Generic[T]):
    priority: int
    tiebreak: float
    seq: int
    enqueued: float = field(compare=False)
    length: int = field(compare=False)
    item: T = field(compare=False)


class LengthBucketQueue(Generic[T]):
    def __init__(self, bucket_edges: Sequence[int] = DEFAULT_BUCKET_EDGES, aging_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if list(bucket_edges) != sorted(set(bucket_edges)):
            raise ValueError(f"bucket edges must be strictly increasing, got {bucket_edges}")
        if aging_s <= 0:
            raise ValueError("aging_s must be positive")
        self.edges = tuple(bucket_edges)
        self.aging_s = aging_s
        self.clock = clock
        self._buckets: list[list[_Entry[T]]] = [[] for _ in range(len(self.edges) + 1)]
        self._seq = itertools.count()
        self._len = 0

    def bucket_of(self, length: int) -> int:
        """Bucket i holds lengths in [edges[i-1], edges[i]); the last one is open-ended."""
        return bisect.bisect_right(self.edges, length)

    def bucket_label(self, index: int) -> str:
        lo = 0 if index == 0 else self.edges[index - 1]
        return f"{lo}-{self.edges[index] - 1}" if index < len(self.edges) else f"{lo}+"

    def put(self, item: T, length: int, priority: int = 0, tiebreak: float = 0.0) -> None:
        heapq.heappush(self._buckets[self.bucket_of(length)],
                       _Entry(priority, tiebreak, next(self._seq), self.clock(), length, item))
        self._len += 1

    def __len__(self) -> int:
        return self._len

    def depth_by_bucket(self) -> dict[str, int]:
        return {self.bucket_label(i): len(b) for i, b in enumerate(self._buckets)}

    def _next_bucket(self) -> list[_Entry[T]] | None:
        now = self.clock()
        best, best_key = None, None
        for bucket in self._buckets:
            if bucket:
                head = bucket[0]
                key = (head.priority - (now - head.enqueued) / self.aging_s, head.tiebreak, head.seq)
                if best_key is None or key < best_key:
                    best, best_key = bucket, key
        return best

    def constrained_get(self, condition: Callable[[T], bool] = lambda _: True, token_budget: int | None = None,
                        max_items: int | None = None) -> list[T]:
        """Take a batch from one bucket, in order, while `condition(item)` holds.

        Stops at the first item that fails the condition (it stays, keeping its
        place) or would push the batch past `token_budget` tokens; a single item
        larger than the budget is still served alone. `condition` may have side
        effects (e.g. reserving KV room): it is called once per item taken, plus
        once for the item that stops the batch.
        """
        bucket = self._next_bucket()
        taken: list[T] = []
        tokens = 0
        while bucket and (max_items is None or len(taken) < max_items):
            head = bucket[0]
            if token_budget is not None and taken and tokens + head.length > token_budget:
                break
            if not condition(head.item):
                break
            heapq.heappop(bucket)
            self._len -= 1
            taken.append(head.item)
            tokens += head.length
        return taken

    def remove_if(self, predicate: Callable[[T], bool]) -> list[T]:
        """Take out every queued item matching `predicate` (e.g. cancelled requests)."""
        removed = []
        for i, bucket in enumerate(self._buckets):
            keep = [e for e in bucket if not predicate(e.item)]
            removed += [e.item for e in bucket if predicate(e.item)]
            heapq.heapify(keep)
            self._buckets[i] = keep
        self._len -= len(removed)
        return removed
