"""A node's CPU cores, leased to one worker's forward at a time (issue 22).

A prefill worker and a decode worker on one CPU node each run torch with all the node's threads
(runtime/cluster.py gives each role the node's cores). When both compute at once, four OpenMP threads
share two cores and each side's barriers wait on threads that are off a core; when one is idle, its
threads sleep. So the two take turns: each forward runs inside `hold()`, and the holder has the node.

The lease is two advisory file locks (flock) in shared memory, named by a key both workers derive
from the run's token and the node id:

    prefill:  lock(turnstile); lock(cores); unlock(turnstile)  ... forward ...  unlock(cores)
    decode:   lock(turnstile); unlock(turnstile); lock(cores)  ... step ...     unlock(cores)

A prefill worker keeps the turnstile while it waits for the cores, so a decode loop that asks again
after its step queues behind it: prefill goes first (requests join the decode batch sooner), a decode
step never waits for more than the prefill batch in front of it. A waiter sleeps in the kernel (no
spinning); a lock dies with its process, so a crashed holder frees the node. Waiting time is counted
(`waited_s`): the side that waits is the side whose cores were lent.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import hashlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol


class LeaseRole(enum.Enum):
    PREFILL = "prefill"  # goes first
    DECODE = "decode"


class CoreLease(Protocol):
    waited_s: float  # wall seconds spent waiting for the lease
    held_s: float  # wall seconds spent holding it

    def hold(self) -> contextlib.AbstractContextManager[None]:
        """The node's cores for the duration of the block."""


class NoLease:
    """Workers alone on their cores (another node, a GPU, colocated): nothing to take turns with."""

    def __init__(self) -> None:
        self.waited_s = 0.0
        self.held_s = 0.0

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        yield


def lease_directory() -> Path:
    """Shared memory where the OS has it (a lock file there never touches a disk), else the temp folder."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def lease_key(run_token: str, node_id: str) -> str:
    """One name per run and node: workers of the same run on the same node share a lease, no one else."""
    return hashlib.sha256(f"{run_token}:{node_id}".encode()).hexdigest()[:20]


class NodeCoreLease:
    def __init__(self, key: str, role: LeaseRole, directory: Path | None = None) -> None:
        folder = directory or lease_directory()
        self.key, self.directory, self.role = key, folder, role
        self.paths = (folder / f"pdserve-cores-{key}.turn", folder / f"pdserve-cores-{key}.lock")
        self._turn, self._cores = (os.open(p, os.O_RDWR | os.O_CREAT, 0o600) for p in self.paths)
        self.waited_s = 0.0
        self.held_s = 0.0
        self.turns = 0

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        asked = time.perf_counter()
        fcntl.flock(self._turn, fcntl.LOCK_EX)
        if self.role == LeaseRole.PREFILL:
            try:
                fcntl.flock(self._cores, fcntl.LOCK_EX)
            finally:
                fcntl.flock(self._turn, fcntl.LOCK_UN)
        else:
            fcntl.flock(self._turn, fcntl.LOCK_UN)
            fcntl.flock(self._cores, fcntl.LOCK_EX)
        got = time.perf_counter()
        self.waited_s += got - asked
        self.turns += 1
        try:
            yield
        finally:
            fcntl.flock(self._cores, fcntl.LOCK_UN)
            self.held_s += time.perf_counter() - got

    def close(self) -> None:
        """Closes this side's descriptors; the files stay (the peer may still hold them open; they are empty)."""
        for fd in (self._turn, self._cores):
            with contextlib.suppress(OSError):
                os.close(fd)
