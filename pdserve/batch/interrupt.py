"""Ctrl-C and `kill` stop a batch at the router's next turn, not wherever the signal lands.

Python raises KeyboardInterrupt at whatever bytecode the main thread runs when a signal
arrives, and when that is a `__del__` or a weakref callback (Ray and gRPC run many) Python
prints the exception and drops it: the batch then ran on to the end. Seen once in CI, where
an interrupted `run-batch` exited 0. The handler here only records the signal; the batch
loop calls `check()` every turn and raises there. A second signal raises at once.
"""

from __future__ import annotations

import signal
import threading


class StopSignals:
    """Context manager: while inside, SIGINT/SIGTERM set a flag that `check()` turns into KeyboardInterrupt."""

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)) -> None:
        self.signals = signals
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # only it may set handlers
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}")
        self.received = signal.Signals(signum)

    def check(self) -> None:
        if self.received is not None:
            raise KeyboardInterrupt(self.received.name)
