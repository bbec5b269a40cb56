"""What the two step-loop workers share: the decode worker (PD) and the colocated worker.

Each runs its model on one ComputeThread in a loop that takes admissions and aborts from an inbox
between steps, and answers the router's polls from Ray threads: finished requests, streamed tokens
and the loop's heartbeat age (the router's watchdog restarts a worker whose loop stopped turning).
A subclass supplies the step and what its inbox items mean; this class owns the inbox, the results
queue, the heartbeat, the stall drill, the streaming bookkeeping and the step counters.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from decode_worker.phases import PhaseClock, RunQueueClock
from engine.core_lease import CoreLease, NoLease
from engine.kv_window import blocks_before_window
from proto.messages import DecodePoll, DecodeResult, PrefillResult, TokenProgress
from proto.stats import LoopStats, PoolStats


@dataclass(frozen=True)
class Abort:
    """A loop inbox item: take this request out between steps and free its blocks."""

    request_id: str


# The loop's inbox carries sequences to admit (a subclass's kind) and Aborts, in the order they were sent.


class StepLoopWorker(ABC):
    """Subclasses call `_start_loop_state()` before `_start_loop()`, and implement `_has_work`, `_step`,
    `_accept` (an inbox item that is not an abort), `_abort_in_loop` and `_streamable`; they hold
    `self.blocks` and `self._lock` (the block manager and its guard) and `self.pool`."""

    # The colocated worker also ends a poll's wait when a prompt finished prefilling, so it always
    # waits in slices; the decode worker waits in one block unless it streams.
    _slice_polls = False

    def _start_loop_state(self, phases: PhaseClock | None = None) -> None:
        """`phases`: the clock the subclass's step laps on (the batcher's), which the loop laps on too."""
        self._loop_queue: queue.Queue[Any] = queue.Queue()  # sequences to admit, and Aborts
        self._results: queue.Queue[DecodeResult] = queue.Queue()
        self._stop = threading.Event()
        self._stepped = threading.Event()  # set after each step: a waiting poll looks at once, not at its next slice
        self.steps = 0
        self.step_seconds = 0.0  # wall time inside steps
        self.step_cpu_seconds = 0.0  # the loop thread's CPU time inside steps: at one torch thread, less
        # than step_seconds by the time it waited for a core or the GIL (with more, OpenMP threads' work too)
        self.step_rows = 0  # sum of batch sizes over steps
        self.steps_by_rows: dict[int, tuple[int, float]] = {}  # batch size -> (steps, wall seconds)
        # Per-phase wall/CPU seconds of the loop thread (decode_worker/phases.py): the step's own phases,
        # and between steps "ingest" (admissions and aborts taken off the inbox) and "finish" (results).
        self.phases = phases or PhaseClock()
        self.poll_cpu_seconds = 0.0  # CPU time of poll() calls on the actor's threads (streamed progress)
        # Of a step's wall time off the CPU, the part the loop thread waited for a core (the rest: the GIL);
        # None where the OS does not say. Counted around `_step`, so a step's result handling is in it too.
        self.step_run_queue_seconds: float | None = None
        self._run_queue = RunQueueClock()  # opened by the loop thread, on its first read
        # Each step runs holding the node's cores when a prefill worker shares them (engine/core_lease.py).
        # While the loop waits for them it is not wedged: polls report no stall (a prefill worker that hangs
        # holding the lease is its own call's timeout, and its death frees the lease).
        self.core_lease: CoreLease = NoLease()
        self._waiting_for_cores = False
        self._heartbeat = time.monotonic()  # the loop's last turn: idle turns every 50 ms, busy ones every step
        self._stall_until = 0.0  # fault drill: see stall_for
        self._streamed: dict[str, int] = {}  # streaming polls: request -> output tokens already reported
        self._progress_seen: object = None  # _progress_key() at the last look (streaming polls)

    def _start_loop(self) -> None:
        self._loop_done = self.compute.submit(self._loop)

    # ---- router-facing ------------------------------------------------------------------------
    def poll(self, timeout: float = 0.5, stream: bool = False) -> DecodePoll:
        """Finished requests since the last poll (waits up to `timeout` for the first one), and the
        loop's heartbeat age, so the router can tell a busy worker from a wedged one.

        With `stream`, also the new tokens of running requests; the wait then ends at the first new
        token too. One poll at a time (the router keeps one in flight per worker)."""
        out: list[DecodeResult] = []
        progress: list[TokenProgress] = []
        sliced = stream or self._slice_polls
        started_cpu = time.thread_time()
        deadline = time.monotonic() + timeout
        while sliced:  # cleared before looking, so a step that ends after the look cuts the wait short
            self._stepped.clear()
            with contextlib.suppress(queue.Empty):
                out.append(self._results.get_nowait())
                break
            wait = max(0.0, deadline - time.monotonic())
            if wait == 0.0 or self._poll_ready() or (stream and (progress := self._progress())):
                break
            self._stepped.wait(min(wait, 0.05))  # a slice: for what no step ends (a request finished at admission)
        if not sliced:
            with contextlib.suppress(queue.Empty):
                out.append(self._results.get(timeout=timeout))
        with contextlib.suppress(queue.Empty):
            while True:
                out.append(self._results.get_nowait())
        prefilled = self._take_prefilled()  # after the results: a result's own prefill record came before it
        if stream and not progress:
            progress = self._progress()
        with self._lock:
            events = self.blocks.take_events()
            released = tuple(self.blocks.take_released().items())
        self.poll_cpu_seconds += time.thread_time() - started_cpu  # one poll at a time: no race
        stalled = 0.0 if self._waiting_for_cores else time.monotonic() - self._heartbeat
        return DecodePoll(tuple(out), stalled, tuple(progress), events or None,
                          prefilled, released)

    def _release_behind_window(self, seqs) -> None:
        """Free the blocks every layer's sliding window has left behind, for sequences that decode (each has
        `request_id` and `next_position`, the position the next step writes). No-op without a window."""
        window = self.pool.layout.kv_window
        if window is None:
            return
        bs = self.pool.layout.block_size
        with self._lock:
            for seq in seqs:
                self.blocks.release_before(seq.request_id, blocks_before_window(seq.next_position, window, bs))

    def stall_for(self, seconds: float) -> None:
        """Fault drill: wedge the step loop for `seconds`, as a hung kernel or a deadlock would, while
        the actor keeps answering calls. The router's watchdog must restart the worker."""
        self._stall_until = time.monotonic() + seconds

    def loop_stats(self) -> LoopStats:
        return LoopStats(steps=self.steps, step_seconds=self.step_seconds, step_rows=self.step_rows,
                         step_cpu_seconds=self.step_cpu_seconds, poll_cpu_seconds=self.poll_cpu_seconds,
                         step_run_queue_seconds=self.step_run_queue_seconds, phase_seconds=dict(self.phases.wall),
                         phase_cpu_seconds=dict(self.phases.cpu), steps_by_rows=dict(self.steps_by_rows),
                         lease_wait_seconds=self.core_lease.waited_s)

    def _pool_stats(self) -> PoolStats:
        """The pool as the block manager sees it; call under `_lock`."""
        b = self.blocks
        return PoolStats(b.num_blocks, b.num_free, len(b.requests()), b.num_cached)

    def _stop_loop(self) -> None:
        self._stop.set()
        self._loop_done.result(timeout=30)
        self.compute.shutdown()

    # ---- hooks with defaults --------------------------------------------------------------------
    def _progress_key(self) -> object:
        """A value that moves on whenever streamable tokens may have changed (after each token a step
        appends, before a poll could miss it), or None: look every time."""
        return None

    def _poll_ready(self) -> bool:
        """Something besides a result that ends a poll's wait."""
        return False

    def _take_prefilled(self) -> tuple[PrefillResult, ...]:
        return ()

    # ---- the loop -------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            if time.monotonic() < self._stall_until:
                time.sleep(0.05)
                continue
            self._heartbeat = time.monotonic()
            self._drain_loop_queue(block=not self._has_work())
            if self._has_work():
                waited = self._run_queue.read()
                self._waiting_for_cores = True
                with self.core_lease.hold():
                    self._heartbeat, self._waiting_for_cores = time.monotonic(), False
                    self._step()
                self._stepped.set()
                if waited is not None:
                    self.step_run_queue_seconds = (self.step_run_queue_seconds or 0.0) + self._run_queue.read() - waited
        self._run_queue.close()

    def _drain_loop_queue(self, block: bool) -> None:
        try:
            item = self._loop_queue.get(timeout=0.05) if block else self._loop_queue.get_nowait()
        except queue.Empty:
            return
        self.phases.start()  # after the wait for the first item
        while True:
            if isinstance(item, Abort):
                self._abort_in_loop(item.request_id)
            else:
                self._accept(item)
            try:
                item = self._loop_queue.get_nowait()
            except queue.Empty:
                break
        self.phases.lap("ingest")
        self.phases.stop()

    def _count_step(self, started: float, started_cpu: float, rows: int) -> None:
        """After a step begun at perf_counter() `started`, thread_time() `started_cpu`, over `rows` rows."""
        self.steps += 1
        self.step_seconds += time.perf_counter() - started
        self.step_cpu_seconds += time.thread_time() - started_cpu
        self.step_rows += rows
        count, seconds = self.steps_by_rows.get(rows, (0, 0.0))
        self.steps_by_rows[rows] = (count + 1, seconds + time.perf_counter() - started)

    def _progress(self) -> list[TokenProgress]:
        """New tokens of streamable sequences since the last call. Reads lists the loop appends to
        (output before token_times): a token read late only comes with the next poll. A sequence that
        left the batch needs no entry: its DecodeResult carries its whole output.
        A streaming poll looks after each step; one that finds `_progress_key()` unchanged skips the walk over
        the batch (at 30 rows and ~100 ms steps it cost the actor ~1.5 ms of CPU per step)."""
        key = self._progress_key()  # read before the sequences: a token appended after it moves the key on
        if key is not None and key == self._progress_seen:
            return []
        self._progress_seen = key
        progress, streamed = [], {}
        for seq in self._streamable():
            n = min(len(seq.output), len(seq.token_times))
            sent = self._streamed.get(seq.request_id, 1)  # output[0] travels on its own (prefill's token)
            if n > sent:
                progress.append(TokenProgress(seq.request_id, sent, tuple(seq.output[sent:n]),
                                              tuple(seq.token_times[sent:n])))
            streamed[seq.request_id] = max(n, sent)
        self._streamed = streamed
        return progress

    # ---- what a subclass supplies -----------------------------------------------------------------
    @abstractmethod
    def _has_work(self) -> bool:
        """Anything to step or to retire."""

    @abstractmethod
    def _step(self) -> None:
        """One step (calls `_count_step`); reports finished requests through `_results`."""

    @abstractmethod
    def _accept(self, item: Any) -> None:
        """An admission taken off the loop queue."""

    @abstractmethod
    def _abort_in_loop(self, request_id: str) -> None:
        """Take a request out between steps and free its blocks."""

    @abstractmethod
    def _streamable(self) -> list[Any]:
        """Running sequences whose new tokens a streaming poll may report."""
