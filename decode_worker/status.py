"""Where a request held by a decode-side worker is: one status, on its sequence.

The decode worker (PD) and the colocated worker each keep every request they hold in one table,
`requests` (request id -> its sequence, guarded by the worker's lock), from the moment its blocks are
reserved until they are freed; the sequence's `status` says where it is. Only these moves happen:

    PD decode worker (decode_worker/worker.py, batcher.py)
        reserve            -> RESERVED     blocks held, KV arriving from the prefill worker
        admit              -> QUEUED       KV complete, first token known; in the step loop's inbox
        loop takes it      -> WAITING      in the batcher's waiting line (no row yet)
        a step admits it   -> RUNNING      a row of the running batch
        its last token     -> RETIRING     out of the batch; blocks held until the step in flight
                                           completes (CUDA overlap), then freed and reported
    colocated worker (decode_worker/colocated.py, chunk_scheduler.py)
        submit             -> QUEUED  -> WAITING -> PREFILLING (prompt chunks running) -> RUNNING

A request leaves the table when it finishes (its result is queued for the next poll) or is aborted.
"""

from __future__ import annotations

from enum import Enum


class SeqStatus(Enum):
    RESERVED = "reserved"
    QUEUED = "queued"
    WAITING = "waiting"
    PREFILLING = "prefilling"
    RUNNING = "running"
    RETIRING = "retiring"

    @property
    def in_loop(self) -> bool:
        """The step loop owns it: only the loop may take it out (an abort goes through its inbox)."""
        return self is not SeqStatus.RESERVED
