"""Where a token's time goes: the gauges a server exports (pdserve/observability/token_time.py) and the
benchmark's reading of them over a run (pdserve/bench/token_time.py)."""

from __future__ import annotations

import threading
import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from decode_worker.phases import PhaseClock
from pdserve.bench.token_time import Breakdown
from pdserve.observability.token_time import NAMES, TokenTimeMetrics
from proto.stats import DecodeStats, LoopStats, PoolStats


def _stats(worker: str, steps: int, forward: float, sample: float, core_wait: float) -> DecodeStats:
    loop = LoopStats(steps=steps, step_seconds=forward + sample, step_rows=steps * 4, poll_cpu_seconds=0.01 * steps,
                     step_run_queue_seconds=core_wait, phase_seconds={"forward": forward, "sample": sample},
                     phase_cpu_seconds={"forward": forward / 2, "sample": sample})
    return DecodeStats(worker, PoolStats(10, 5, 1, 0), running=4, waiting=0, loop=loop)


def test_a_run_is_taken_apart_per_step_and_per_token_from_two_scrapes():
    registry = CollectorRegistry()
    m = TokenTimeMetrics(registry)
    laps = PhaseClock()
    laps.wall, laps.cpu = {"wait": 1.0, "replies": 0.2}, {"wait": 0.01, "replies": 0.1}
    m.update_workers([_stats("d0", 10, 0.5, 0.1, 0.05), _stats("d1", 10, 0.5, 0.1, 0.05)])
    m.update_router(laps)
    m.streamed(40)
    before = Breakdown.parse(generate_latest(registry).decode())
    # over the run: 20 more steps (10 per worker), 80 more tokens, the router waited 2 s more
    m.update_workers([_stats("d0", 20, 0.9, 0.2, 0.15), _stats("d1", 20, 0.9, 0.2, 0.15)])
    laps.wall = {"wait": 3.0, "replies": 0.6}
    m.update_router(laps)
    m.streamed(80)
    run = Breakdown.parse(generate_latest(registry).decode()).minus(before)
    assert run["steps"] == 20 and run["tokens"] == 80 and run["rows_per_step"] == 4.0
    assert run["prefill_tokens_per_step"] == 0.0  # a PD decode worker computes no prompt
    assert run["step_ms"]["forward"] == pytest.approx(1e3 * 0.8 / 20)
    assert run["step_ms"]["sample"] == pytest.approx(1e3 * 0.2 / 20)
    assert run["step_ms"]["step total"] == pytest.approx(1e3 * 1.0 / 20)
    assert run["step_ms"]["of it, waiting for a core"] == pytest.approx(1e3 * 0.2 / 20)
    assert run["token_ms"]["router wait"] == pytest.approx(1e3 * 2.0 / 80)
    assert run["token_ms"]["router replies"] == pytest.approx(1e3 * 0.4 / 80)
    assert run["token_ms"]["worker poll CPU"] == pytest.approx(1e3 * 0.2 / 80)
    assert "20 steps" in Breakdown.describe(run) and "forward 40.0" in Breakdown.describe(run)
    text = generate_latest(registry).decode()
    assert all(f"# TYPE {name} " in text for name in NAMES)  # every name exported
    assert Breakdown().minus(Breakdown()) == {} and Breakdown.describe({}) == "n/a"  # another server: nothing


def test_a_watched_thread_reports_its_own_cpu_time():
    registry = CollectorRegistry()
    m = TokenTimeMetrics(registry)
    started, stop = threading.Event(), threading.Event()

    def spin() -> None:
        started.set()
        end = time.thread_time() + 0.2
        while time.thread_time() < end:  # 0.2 s of this thread's own CPU, however loaded the machine
            pass
        stop.wait()

    t = threading.Thread(target=spin)
    t.start()
    started.wait()
    m.watch_thread("router", t.ident)
    while t.is_alive() and not stop.is_set():
        m.update_threads()
        if Breakdown.parse(generate_latest(registry).decode()).values.get("thread/router", 0) >= 0.2:
            break
        time.sleep(0.05)
    stop.set()
    t.join()
    cpu = Breakdown.parse(generate_latest(registry).decode()).values["thread/router"]
    assert 0.2 <= cpu < 5.0
    m.update_threads()  # the thread is gone: dropped, its last value kept
    assert Breakdown.parse(generate_latest(registry).decode()).values["thread/router"] == cpu
