"""Where a decode loop's time goes: wall and thread-CPU seconds per named phase, summed over steps.

The loop marks the start of a stretch of work (`start`), then closes each phase with `lap(name)`; each
lap adds the time since the previous mark. `stop` ends the stretch, so a lap called from outside one
(e.g. `ContinuousBatcher.remove` settling a step between steps) counts nothing. A mark costs two clock
reads (~0.6 us for `thread_time`): cheap enough to stay on at a few laps per step.

Thread CPU time (`time.thread_time`) is the calling thread's own: at one torch thread it is the step's
work; wall minus CPU is time the thread was runnable but off a core, or waiting for the GIL. On CUDA a
phase's times are its host side (launches), not the kernels. `RunQueueClock` splits wall minus CPU further:
the part spent waiting for a core (the rest is blocked: the GIL, a page fault).
"""

from __future__ import annotations

import os
import time


class PhaseClock:
    def __init__(self) -> None:
        self.wall: dict[str, float] = {}  # phase -> wall seconds
        self.cpu: dict[str, float] = {}  # phase -> the loop thread's CPU seconds
        self._mark: tuple[float, float] | None = None  # (perf_counter, thread_time) of the last mark

    def start(self) -> None:
        self._mark = (time.perf_counter(), time.thread_time())

    def lap(self, phase: str) -> None:
        """Add the time since the last mark to `phase` and mark again; nothing outside start..stop."""
        if self._mark is None:
            return
        wall, cpu = time.perf_counter(), time.thread_time()
        self.wall[phase] = self.wall.get(phase, 0.0) + wall - self._mark[0]
        self.cpu[phase] = self.cpu.get(phase, 0.0) + cpu - self._mark[1]
        self._mark = (wall, cpu)

    def stop(self) -> None:
        self._mark = None

    def snapshot(self) -> dict[str, dict[str, float]]:
        """{"phase_seconds": {phase: wall s}, "phase_cpu_seconds": {phase: CPU s}}: copies, for stats()."""
        return {"phase_seconds": dict(self.wall), "phase_cpu_seconds": dict(self.cpu)}


class RunQueueClock:
    """Seconds the thread that first reads it has spent runnable but waiting for a core: Linux's per-thread
    schedstat run-queue delay. `read()` is None where that is not available. The file stays open (a read
    costs ~1 us); `close` when the thread is done."""

    def __init__(self) -> None:
        self._fd: int | None = None
        self._absent = False

    def read(self) -> float | None:
        if self._fd is None:
            if self._absent:
                return None
            try:  # thread-self: resolved now, to the calling thread, for good
                self._fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
            except OSError:
                self._absent = True
                return None
        return int(os.pread(self._fd, 64, 0).split()[1]) * 1e-9  # cpu_ns, run_queue_ns, slices

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd, self._absent = None, True
