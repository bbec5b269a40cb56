"""does_fit: the router's exact mirror of each decode worker's free KV blocks.

The router is the only one who reserves blocks, and every release comes back
to it (finished, aborted, or worker lost), so it can decide where a request
fits without asking. Conservative: a request holds blocks for
prompt + max_tokens from reservation to finish, so decode never runs out.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DecodeCapacity:
    worker_id: str
    num_blocks: int
    block_size: int
    max_num_seqs: int
    holds: dict[str, int] = field(default_factory=dict)  # attempt id -> blocks

    @property
    def free_blocks(self) -> int:
        return self.num_blocks - sum(self.holds.values())

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def does_fit(self, tokens: int) -> bool:
        return self.blocks_for(tokens) <= self.free_blocks


class Placement:
    """Chooses a decode worker for each request: the one with the most free blocks that fits."""

    def __init__(self) -> None:
        self.workers: dict[str, DecodeCapacity] = {}

    def add_worker(self, capacity: DecodeCapacity) -> None:
        self.workers[capacity.worker_id] = capacity

    def remove_worker(self, worker_id: str) -> list[str]:
        """Forget a lost worker; return the attempt ids it held."""
        cap = self.workers.pop(worker_id, None)
        return list(cap.holds) if cap else []

    def place(self, attempt_id: str, tokens: int) -> str | None:
        fitting = [w for w in self.workers.values() if w.does_fit(tokens)]
        if not fitting:
            return None
        best = max(fitting, key=lambda w: (w.free_blocks, w.worker_id))
        best.holds[attempt_id] = best.blocks_for(tokens)
        return best.worker_id

    def release(self, worker_id: str | None, attempt_id: str) -> None:
        cap = self.workers.get(worker_id) if worker_id else None
        if cap:
            cap.holds.pop(attempt_id, None)

    def fits_anywhere_when_empty(self, tokens: int) -> bool:
        """Could this request ever fit (an empty worker)? If not, it must fail, not wait forever."""
        return any(w.blocks_for(tokens) <= w.num_blocks for w in self.workers.values())

    def held_blocks(self) -> int:
        return sum(sum(w.holds.values()) for w in self.workers.values())
