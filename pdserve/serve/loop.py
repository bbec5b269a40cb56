"""The router on its own thread, and the bridge between it and the HTTP handlers' event loop.

The router's calls block (they wait on Ray futures), so one thread owns it:
handlers hand it submissions and aborts through a queue, and it hands each
handler its request's events through that handler's own asyncio queue:

    ("tokens", [ids])   new output tokens, in order (the first as soon as prefill returns it)
    ("done", request)   the request finished: DONE, or FAILED with its error (aborted ones too)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from pdserve.batch.format import metrics_record
from pdserve.observability.dashboard.collector import MetricsCollector
from pdserve.serve.admission import Admission
from router.api import OnFinished, OnTokens, RouterAPI
from router.request import Request

log = logging.getLogger("pdserve.serve")


class Sink:
    """One request's events, delivered into the HTTP event loop from the router thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def put(self, event: tuple[str, Any]) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is closed: the server is going down
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class ServingLoop:
    def __init__(self, make_router: Callable[[OnFinished, OnTokens], RouterAPI], admission: Admission,
                 collector: MetricsCollector, tokenizer: Any = None) -> None:
        """tokenizer: lets the metrics check constrained answers (counted as validation failures if not valid)."""
        self.router = make_router(self._finished, self._tokens)
        self.admission, self.collector, self.tokenizer = admission, collector, tokenizer
        self._inbox: queue.Queue[tuple[str, Request, Any]] = queue.Queue()
        self._sinks: dict[str, Sink] = {}  # custom_id -> sink; the router thread's only
        self._stop = threading.Event()
        self.error: str | None = None  # set if the router thread died: /health says so
        self._thread = threading.Thread(target=self._run, name="router", daemon=True)
        self._thread.start()

    # ---- called from the HTTP handlers -------------------------------------------------------
    def submit(self, req: Request, sink: Sink) -> None:
        """Admission has counted the request in; the router thread takes it from here."""
        self._inbox.put(("submit", req, sink))

    def abort(self, req: Request, reason: str) -> None:
        self._inbox.put(("abort", req, reason))

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
                sink.put(("error", self.error))

    def _drain(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.05) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, req, extra = item
            if kind == "submit":
                self._sinks[req.custom_id] = extra
                self.router.submit(req)
            else:  # an abort; a request that finished meanwhile is no longer in flight: nothing to do
                self.router.abort(req.request_id, extra)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _tokens(self, req: Request, new: list[int]) -> None:
        if req.streamed == len(new):  # its first tokens: prefill is done
            self.admission.prefilled(req)
        sink = self._sinks.get(req.custom_id)
        if sink is not None:
            sink.put(("tokens", new))

    def _finished(self, req: Request) -> None:
        self.admission.gone(req)
        self.collector.record(metrics_record(req, self.tokenizer))
        sink = self._sinks.pop(req.custom_id, None)
        if sink is not None:
            sink.put(("done", req))
