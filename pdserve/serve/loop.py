"""The router on its own thread, and the bridge between it and the HTTP handlers' event loop.

The router's calls block (they wait on Ray futures), so one thread owns it: handlers hand it `Submit`
and `Abort` messages through a queue, and it hands each handler its request's events through that
handler's own asyncio queue (a `Sink`), as the dataclasses of pdserve/serve/events.py:

    Tokens(ids)          new output tokens, in order (the first as soon as prefill returns it)
    Finished(request)    the request finished: DONE, or FAILED with its error (aborted ones too)
    RouterDied(error)    the router thread died: no more events will come

A handler follows its request through an `InFlight`, which also ends it at its deadline (`Expired`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from pdserve.observability.dashboard.collector import MetricsCollector
from pdserve.openai.records import metrics_record
from pdserve.serve.admission import Admission
from pdserve.serve.events import Event, Expired, Finished, Outcome, RouterDied, Tokens
from router.api import OnFinished, OnTokens, RouterAPI
from router.request import Request

log = logging.getLogger("pdserve.serve")


# ---- messages, handlers -> the router thread ---------------------------------------------------------
@dataclass(frozen=True)
class Submit:
    req: Request
    sink: Sink


@dataclass(frozen=True)
class Abort:
    req: Request
    reason: str


class Sink:
    """One request's events, delivered into the HTTP event loop from the router thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.events: asyncio.Queue[Event] = asyncio.Queue()

    def put(self, event: Event) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is closed: the server is going down
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class ServingLoop:
    def __init__(self, make_router: Callable[[OnFinished, OnTokens], RouterAPI], admission: Admission,
                 collector: MetricsCollector) -> None:
        self.router = make_router(self._finished, self._tokens)
        self.admission, self.collector = admission, collector
        self._inbox: queue.Queue[Submit | Abort] = queue.Queue()
        self._sinks: dict[str, Sink] = {}  # custom_id -> sink; the router thread's only
        self._stop = threading.Event()
        self.error: str | None = None  # set if the router thread died: /health says so
        self._thread = threading.Thread(target=self._run, name="router", daemon=True)
        self._thread.start()

    # ---- called from the HTTP handlers -------------------------------------------------------
    def submit(self, req: Request, sink: Sink) -> None:
        """Admission has counted the request in; the router thread takes it from here."""
        self._inbox.put(Submit(req, sink))

    def abort(self, req: Request, reason: str) -> None:
        self._inbox.put(Abort(req, reason))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    # ---- the router thread -------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain(block=not self.router.active)
                if self.router.active:
                    self.router.tick(wait_s=0.02)
                self.collector.refresh(self.router)
        except Exception as e:  # a bug: fail every open request rather than leave its client hanging
            log.exception("the router thread died")
            self.error = f"router thread died: {e!r}"
            for sink in self._sinks.values():
                sink.put(RouterDied(self.error))

    def _drain(self, block: bool) -> None:
        try:
            message = self._inbox.get(timeout=0.05) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if isinstance(message, Submit):
                self._sinks[message.req.custom_id] = message.sink
                self.router.submit(message.req)
            else:  # an abort; a request that finished meanwhile is no longer in flight: nothing to do
                self.router.abort(message.req.request_id, message.reason)
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _tokens(self, req: Request, new: list[int]) -> None:
        if req.streamed == len(new):  # its first tokens: prefill is done
            self.admission.prefilled(req)
        sink = self._sinks.get(req.custom_id)
        if sink is not None:
            sink.put(Tokens(new))

    def _finished(self, req: Request) -> None:
        self.admission.gone(req)
        self.collector.record(metrics_record(req))
        sink = self._sinks.pop(req.custom_id, None)
        if sink is not None:
            sink.put(Finished(req))


class InFlight:
    """One admitted request, handed to the serving loop on creation; its events, until its deadline.
    Created on the event loop that reads them."""

    def __init__(self, loop: ServingLoop, req: Request, timeout_s: float) -> None:
        self.loop, self.req, self.timeout_s = loop, req, timeout_s
        self.sink = Sink(asyncio.get_running_loop())
        loop.submit(req, self.sink)
        self.deadline = time.monotonic() + timeout_s

    async def next(self) -> Event:
        """The request's next event; past its deadline, abort it and say so."""
        try:
            return await asyncio.wait_for(self.sink.events.get(), timeout=max(0.0, self.deadline - time.monotonic()))
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            self.abort(f"deadline exceeded ({self.timeout_s:g}s)")
            return Expired(f"the request did not finish within {self.timeout_s:g}s (--request-timeout)")

    async def outcome(self) -> Outcome:
        """The event that ends the request (its tokens skipped)."""
        while True:
            event = await self.next()
            if not isinstance(event, Tokens):
                return event

    def abort(self, reason: str) -> None:
        self.loop.abort(self.req, reason)
