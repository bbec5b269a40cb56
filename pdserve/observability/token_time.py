"""Where an output token's time goes in a server, on /metrics: the pieces between the decode step and the client.

    pdserve_worker_phase_seconds{worker, phase, clock}   a step loop's phases (decode_worker/phases.py), wall / cpu
    pdserve_worker_steps{worker}, pdserve_worker_step_seconds{worker}, pdserve_worker_core_wait_seconds{worker}
    pdserve_worker_poll_cpu_seconds{worker}              the worker's CPU answering polls (streamed progress)
    pdserve_worker_step_rows{worker}                     rows its steps ran (decode rows + prompt chunks)
    pdserve_worker_prefill_tokens{worker}                prompt tokens its steps computed (colocated: chunks)
    pdserve_router_seconds{piece, clock}                 the router thread: intake, dispatch, wait (ray.wait idle),
                                                         replies (ray.get + handling, tokens handed on), collector
    pdserve_thread_cpu_seconds{thread}                   CPU of the server process's router and HTTP threads
    pdserve_streamed_tokens_total                        output tokens handed to the HTTP handlers

All are cumulative since the server started (gauges copied from counters kept elsewhere, so a restarted
worker's start again from 0): a benchmark takes the difference over a run (pdserve/bench/token_time.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge

from proto.stats import StepWorkerStats

NAMES = ("pdserve_worker_phase_seconds", "pdserve_worker_steps", "pdserve_worker_step_seconds",
         "pdserve_worker_core_wait_seconds", "pdserve_worker_poll_cpu_seconds", "pdserve_router_seconds",
         "pdserve_thread_cpu_seconds", "pdserve_streamed_tokens_total", "pdserve_worker_step_rows",
         "pdserve_worker_prefill_tokens")


class Laps(Protocol):
    """What the router thread's phase clock offers (decode_worker.phases.PhaseClock has this shape)."""

    wall: dict[str, float]
    cpu: dict[str, float]


class TokenTimeMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        g = lambda name, doc, labels: Gauge(name, doc, labels, registry=registry)  # noqa: E731
        self.phase = g("pdserve_worker_phase_seconds", "Step-loop seconds per phase, summed",
                       ["worker", "phase", "clock"])
        self.steps = g("pdserve_worker_steps", "Steps a step-loop worker ran", ["worker"])
        self.step_seconds = g("pdserve_worker_step_seconds", "Wall seconds inside steps", ["worker"])
        self.core_wait = g("pdserve_worker_core_wait_seconds", "Step seconds runnable without a core", ["worker"])
        self.poll_cpu = g("pdserve_worker_poll_cpu_seconds", "CPU seconds of poll() calls", ["worker"])
        self.rows = g("pdserve_worker_step_rows", "Rows of its steps, summed", ["worker"])
        self.prefill_tokens = g("pdserve_worker_prefill_tokens", "Prompt tokens its steps computed", ["worker"])
        self.router = g("pdserve_router_seconds", "Router thread seconds per piece", ["piece", "clock"])
        self.thread_cpu = g("pdserve_thread_cpu_seconds", "CPU seconds of a server thread", ["thread"])
        self.tokens = Counter("pdserve_streamed_tokens", "Output tokens handed to the HTTP handlers", registry=registry)
        self._threads: dict[str, int] = {}  # name -> thread ident
        self._lock = threading.Lock()

    def watch_thread(self, name: str, ident: int | None) -> None:
        """Report this thread's CPU time (a Linux per-thread clock; nothing where there is none)."""
        if ident is not None and hasattr(time, "pthread_getcpuclockid"):
            with self._lock:
                self._threads[name] = ident

    def streamed(self, n: int) -> None:
        self.tokens.inc(n)

    def update_workers(self, stats: Iterable[StepWorkerStats]) -> None:
        for s in stats:
            w, loop = s.worker_id, s.loop
            for clock, phases in (("wall", loop.phase_seconds), ("cpu", loop.phase_cpu_seconds)):
                for phase, seconds in phases.items():
                    self.phase.labels(w, phase, clock).set(seconds)
            self.steps.labels(w).set(loop.steps)
            self.step_seconds.labels(w).set(loop.step_seconds)
            self.core_wait.labels(w).set(loop.step_run_queue_seconds or 0.0)
            self.poll_cpu.labels(w).set(loop.poll_cpu_seconds)
            self.rows.labels(w).set(loop.step_rows)
            self.prefill_tokens.labels(w).set(getattr(s, "prefill_tokens", 0))  # a PD decode worker computes none

    def update_router(self, laps: Laps) -> None:
        for clock, pieces in (("wall", dict(laps.wall)), ("cpu", dict(laps.cpu))):
            for piece, seconds in pieces.items():
                self.router.labels(piece, clock).set(seconds)

    def update_threads(self) -> None:
        """At scrape time: each watched thread's CPU clock (a thread that ended keeps its last value)."""
        with self._lock:
            threads = dict(self._threads)
        for name, ident in threads.items():
            try:
                self.thread_cpu.labels(name).set(time.clock_gettime(time.pthread_getcpuclockid(ident)))
            except (OSError, OverflowError):  # the thread is gone
                with self._lock:
                    self._threads.pop(name, None)
