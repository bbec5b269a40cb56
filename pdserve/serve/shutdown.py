"""Stopping `pdserve serve` like a server: SIGTERM and SIGINT drain, they do not cut.

systemd, Kubernetes and Ray stop a process with SIGTERM and wait a grace period before SIGKILL. The
server uses that period: it stops accepting (503 + Retry-After, and /health answers 503 so a load
balancer moves away), lets what is in flight finish within `--shutdown-timeout`, aborts the rest (each
open stream gets an error chunk, the router frees their KV blocks), stops the HTTP server and the
workers, and exits 0, printing one line per step. A second signal skips the wait: abort at once.

    stop = StopRequest.install()          # after ray.init, which sets its own SIGTERM handler
    stop.wait(lambda: server alive)       # until a signal (or the server died)
    drain(running, timeout_s, stop)       # the steps above
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from router.request import Request

SHUTDOWN_RETRY_AFTER_S = 5  # what a refused client is told: another replica, or this one restarted, by then


def say(line: str) -> None:
    print(f"pdserve: {line}", file=sys.stderr, flush=True)


class StopRequest:
    """SIGTERM/SIGINT received: the first asks for a drain, the second for an immediate abort.
    The handlers only set events; the main thread does the work (no exception lands mid-bytecode)."""

    def __init__(self) -> None:
        self.requested = threading.Event()
        self.hurry = threading.Event()
        self.signal_name = ""

    @classmethod
    def install(cls, signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)) -> StopRequest:
        stop = cls()
        for s in signals:
            signal.signal(s, stop._handle)
        return stop

    def _handle(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self.requested.is_set():
            self.hurry.set()
            say(f"second {name}: aborting what is in flight now")
            return
        self.signal_name = name
        self.requested.set()

    def wait(self, alive: Callable[[], bool], poll_s: float = 0.5) -> None:
        """Block until a stop is requested or `alive()` turns false."""
        while alive() and not self.requested.wait(poll_s):
            pass


class Drainable(Protocol):
    """What drain needs of the serving loop (pdserve/serve/loop.py ServingLoop)."""

    def close_admission(self, message: str, retry_after_s: int) -> None: ...

    def in_flight(self) -> int: ...

    def unfinished(self) -> list[Request]: ...

    def abort(self, req: Request, reason: str) -> None: ...


@dataclass(frozen=True)
class DrainResult:
    in_flight: int  # when the drain began
    finished: int  # of those, finished within the timeout
    aborted: int  # aborted at the timeout (their streams end with an error chunk)


def drain_loop(loop: Drainable, timeout_s: float, hurry: threading.Event, grace_s: float = 10.0) -> DrainResult:
    """Close admission, wait for the requests in flight up to `timeout_s` (or until `hurry`), abort the rest
    and wait (up to `grace_s`) until every abort has reached its handler."""
    loop.close_admission("the server is shutting down; retry on another replica or later", SHUTDOWN_RETRY_AFTER_S)
    start = loop.in_flight()
    say(f"draining: no new requests (503), {start} in flight get up to {timeout_s:g}s (--shutdown-timeout)")
    deadline = time.monotonic() + timeout_s
    while loop.in_flight() and time.monotonic() < deadline and not hurry.is_set():
        time.sleep(0.05)
    left = loop.unfinished()
    if left:
        say(f"aborting {len(left)} requests not finished within {timeout_s:g}s; their KV blocks are freed")
        for req in left:
            loop.abort(req, f"the server is shutting down (not finished within --shutdown-timeout {timeout_s:g}s)")
    else:
        say(f"all {start} requests in flight finished")
    deadline = time.monotonic() + grace_s
    while loop.in_flight() and time.monotonic() < deadline:
        time.sleep(0.05)
    return DrainResult(start, max(0, start - len(left)), len(left))
