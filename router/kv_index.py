"""Which worker holds which KV block, as the workers report it: the router's view of every prefix cache.

Workers report `KVEvents` (keys stored and evicted since their last report) on replies the router
already receives: decode workers on each poll, prefill workers with each batch's results. The
index is a hint for placement only, never a promise: a worker decides at reservation what it
actually shares, so a stale entry costs a cache miss, not a wrong answer. A lost worker loses all
its entries (a restarted one starts with an empty cache).
"""

from __future__ import annotations

from collections import defaultdict

from engine.prefix_cache import BlockKey, KVEvents, block_keys


class KVIndex:
    def __init__(self, block_size: int, salt: str) -> None:
        self.block_size, self.salt = block_size, salt
        self._holders: dict[BlockKey, set[str]] = defaultdict(set)
        self._keys: dict[str, set[BlockKey]] = defaultdict(set)

    def keys(self, token_ids: list[int] | tuple[int, ...]) -> list[BlockKey]:
        """The same chain of keys the workers compute (same block size, same model fingerprint)."""
        return block_keys(token_ids, self.block_size, self.salt)

    def apply(self, worker_id: str, events: KVEvents | None) -> None:
        if not events:
            return
        mine = self._keys[worker_id]
        for key in events.removed:
            mine.discard(key)
            holders = self._holders.get(key)
            if holders is not None:
                holders.discard(worker_id)
                if not holders:
                    del self._holders[key]
        for key in events.stored:
            mine.add(key)
            self._holders[key].add(worker_id)

    def remove_worker(self, worker_id: str) -> int:
        """Forget everything a lost worker held; returns how many entries went."""
        keys = self._keys.pop(worker_id, set())
        for key in keys:
            holders = self._holders.get(key)
            if holders is not None:
                holders.discard(worker_id)
                if not holders:
                    del self._holders[key]
        return len(keys)

    def overlaps(self, keys: list[BlockKey]) -> dict[str, int]:
        """Per worker: how many leading blocks of a prompt (its `keys`) it holds."""
        counts: dict[str, int] = {}
        alive: set[str] | None = None
        for depth, key in enumerate(keys):
            holders = self._holders.get(key)
            alive = set(holders) if alive is None and holders else (alive & holders if alive and holders else set())
            if not alive:
                break
            for w in alive:
                counts[w] = depth + 1
        return counts

    def held(self, worker_id: str) -> int:
        return len(self._keys.get(worker_id, ()))
