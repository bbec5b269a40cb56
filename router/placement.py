"""does_fit: the router's exact mirror of each decode worker's free KV blocks.

The router is the only one who reserves blocks, and every release comes back
to it (finished, aborted, or worker lost), so it can decide where a request
fits without asking. Conservative: a request holds blocks for
prompt + max_tokens from reservation to finish, so decode never runs out.

Sliding-window models (every layer windowed: `kv_window`): a PD reservation leaves out the prompt
blocks before the first decode step's window (engine/kv_window.reserved_blocks, the decode worker's
own rule), and a hold shrinks as the decode worker reports blocks the window has left behind
(`shrink`, from DecodePoll.released_blocks): the mirror counts what the worker holds, never less.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.kv_window import blocks_before_window
from engine.prefix_cache import BlockKey
from router.kv_index import KVIndex


@dataclass
class DecodeCapacity:
    worker_id: str
    num_blocks: int
    block_size: int
    max_num_seqs: int
    holds: dict[str, int] = field(default_factory=dict)  # attempt id -> blocks
    max_requests: int | None = None  # requests held at once (colocated workers: their batch + a backlog)
    kv_window: int | None = None  # every layer's window (the widest); None: some layer sees every position

    @property
    def free_blocks(self) -> int:
        return self.num_blocks - sum(self.holds.values())

    def blocks_for(self, tokens: int, prompt_tokens: int = 0) -> int:
        """Blocks a reservation of `tokens` holds; given its prompt, less the prompt blocks before the window."""
        return -(-tokens // self.block_size) - blocks_before_window(prompt_tokens, self.kv_window, self.block_size)

    def does_fit(self, tokens: int, prompt_tokens: int = 0) -> bool:
        if self.max_requests is not None and len(self.holds) >= self.max_requests:
            return False
        return self.blocks_for(tokens, prompt_tokens) <= self.free_blocks


class Placement:
    """Chooses a decode worker for each request: among those it fits, the one with the most free blocks,
    less `overlap_weight` x the blocks of the prompt it would have to receive (those it does not cache)."""

    def __init__(self, overlap_weight: float = 1.0) -> None:
        self.workers: dict[str, DecodeCapacity] = {}
        self.overlap_weight = overlap_weight

    def add_worker(self, capacity: DecodeCapacity) -> None:
        self.workers[capacity.worker_id] = capacity

    def remove_worker(self, worker_id: str) -> list[str]:
        """Forget a lost worker; return the attempt ids it held."""
        cap = self.workers.pop(worker_id, None)
        return list(cap.holds) if cap else []

    def place(self, attempt_id: str, tokens: int, cached: dict[str, int] | None = None,
              prompt_tokens: int = 0) -> str | None:
        """`cached`: per worker, leading blocks of this prompt it holds (router/kv_index.py). `prompt_tokens`
        (PD only): lets a sliding-window model reserve less (the decode worker skips the same blocks)."""
        fitting = [w for w in self.workers.values() if w.does_fit(tokens, prompt_tokens)]
        if not fitting:
            return None
        cached = cached or {}
        best = max(fitting, key=lambda w: (w.free_blocks + self.overlap_weight * cached.get(w.worker_id, 0),
                                           w.worker_id))
        best.holds[attempt_id] = best.blocks_for(tokens, prompt_tokens)
        return best.worker_id

    def release(self, worker_id: str | None, attempt_id: str) -> None:
        cap = self.workers.get(worker_id) if worker_id else None
        if cap:
            cap.holds.pop(attempt_id, None)

    def shrink(self, worker_id: str, released: tuple[tuple[str, int], ...]) -> None:
        """The worker freed these (attempt, blocks) behind a sliding window; finished attempts are ignored."""
        cap = self.workers.get(worker_id)
        for attempt_id, n in released if cap else ():
            if attempt_id in cap.holds:
                cap.holds[attempt_id] = max(0, cap.holds[attempt_id] - n)

    def fits_anywhere_when_empty(self, tokens: int) -> bool:
        """Could this request ever fit (an empty worker)? If not, it must fail, not wait forever."""
        return any(w.blocks_for(tokens) <= w.num_blocks for w in self.workers.values())

    def held_blocks(self) -> int:
        return sum(sum(w.holds.values()) for w in self.workers.values())


class PrefixRouting:
    """KV-aware choice of prefill and decode workers (as Dynamo's KV router): a worker's cost is
    `overlap_weight` x the blocks it would have to compute (prefill) or receive (decode) for this
    prompt, given the leading blocks its cache holds (`KVIndex`), plus its load in blocks: in-flight
    prefill work, or blocks held on the decode worker. Requests sharing a header go where it is cached
    until that worker is busier than recomputing the header elsewhere would cost."""

    def __init__(self, overlap_weight: float = 1.0) -> None:
        self.overlap_weight = overlap_weight
        self.prefill_index: KVIndex | None = None
        self.decode_index: KVIndex | None = None
        self._inflight: dict[str, dict[str, int]] = {}  # prefill worker -> attempt id -> blocks to compute

    def configure(self, block_size: int, salt: str) -> None:
        if self.prefill_index is None:
            self.prefill_index, self.decode_index = KVIndex(block_size, salt), KVIndex(block_size, salt)

    def keys(self, token_ids: list[int]) -> list[BlockKey]:
        return self.prefill_index.keys(token_ids) if self.prefill_index else []

    def prefill_worker(self, candidates: list[str], keys: list[BlockKey], num_tokens: int) -> str | None:
        """The cheapest prefill worker among `candidates` for a prompt whose block keys are `keys`."""
        if not candidates:
            return None
        need = -(-num_tokens // self.prefill_index.block_size) if self.prefill_index else 0
        cached = self.prefill_index.overlaps(keys) if self.prefill_index else {}

        def cost(w: str) -> tuple[float, str]:
            return self.overlap_weight * (need - cached.get(w, 0)) + sum(self._inflight.get(w, {}).values()), w

        return min(candidates, key=cost)

    def decode_overlap(self, keys: list[BlockKey]) -> dict[str, int]:
        return self.decode_index.overlaps(keys) if self.decode_index else {}

    def prefill_sent(self, worker_id: str, attempt_id: str, keys: list[BlockKey], num_tokens: int) -> None:
        cached = self.prefill_index.overlaps(keys).get(worker_id, 0) if self.prefill_index else 0
        need = -(-num_tokens // self.prefill_index.block_size) if self.prefill_index else 0
        self._inflight.setdefault(worker_id, {})[attempt_id] = need - cached

    def prefill_done(self, worker_id: str, attempt_ids: list[str]) -> None:
        mine = self._inflight.get(worker_id, {})
        for a in attempt_ids:
            mine.pop(a, None)

    def worker_lost(self, worker_id: str) -> None:
        """A lost worker's cache died with it (a restart comes back empty), and so did its work."""
        self._inflight.pop(worker_id, None)
        for index in (self.prefill_index, self.decode_index):
            if index is not None:
                index.remove_worker(worker_id)
