"""The serving loop hands a tick's events to the HTTP event loop together (pdserve/serve/loop.py `deliver`):
one wake-up of each event loop per tick, every event in order in its own handler's queue."""

from __future__ import annotations

import asyncio
import threading

from pdserve.serve.events import Tokens
from pdserve.serve.loop import Sink, deliver


def test_a_ticks_events_reach_each_handler_in_order_with_one_wake_up_per_event_loop():
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    thread = threading.Thread(target=lambda: (asyncio.set_event_loop(loop), ready.set(), loop.run_forever()))
    thread.start()
    ready.wait()
    try:
        wakeups = []
        real = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *a: (wakeups.append(a), real(*a))[1]  # count the self-pipe writes
        sinks = [Sink(loop) for _ in range(3)]
        outbox = [(sinks[i % 3], Tokens([step, i])) for step in range(4) for i in range(3)]  # 4 steps x 3 requests
        deliver(outbox)
        assert len(wakeups) == 1  # one for the tick's 12 events, not 12

        async def drain(sink: Sink) -> list[list[int]]:
            return [(await sink.events.get()).ids for _ in range(4)]

        got = [asyncio.run_coroutine_threadsafe(drain(s), loop).result(timeout=10) for s in sinks]
        assert got == [[[step, i] for step in range(4)] for i in range(3)]
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
