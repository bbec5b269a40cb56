"""`pdserve run-batch`: an offline OpenAI-format batch through the disaggregated cluster.

Input is streamed: lines are parsed and submitted while earlier requests are
served, and at most `max_pending` requests are held at once. Output lines
are written and flushed as requests finish, so a long batch shows progress
on disk and memory stays bounded.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from engine.config import EngineConfig
from pdserve.batch.format import MAX_LINE_BYTES, check_paths, iter_lines, parse_line
from pdserve.batch.interrupt import StopSignals
from pdserve.batch.journal import Journal, input_identity
from pdserve.observability.dashboard.collector import MetricsCollector
from pdserve.observability.metrics import SLO, from_record
from pdserve.openai.limits import ModelLimits, model_limits
from pdserve.openai.records import error_record, success_record
from pdserve.runtime.backend import Backend, leaked_blocks
from pdserve.runtime.cluster import ClusterConfig
from router.api import RouterAPI
from router.request import Request, State
from router.router import RouterConfig


@dataclass(frozen=True)
class BatchOptions:
    default_max_tokens: int = 512
    ignore_eos: bool = False
    max_pending: int = 4096  # requests held in memory (queued or running) at once
    progress: bool = True
    resume: bool = True  # continue an interrupted run of the same batch (see pdserve/batch/journal.py)
    slo: SLO = SLO()


@dataclass
class BatchSummary:
    output_path: str
    lines: int = 0
    resumed: int = 0  # lines finished by an earlier, interrupted run
    within_slo: int = 0  # succeeded within both the TTFT and the TPOT SLO
    succeeded: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served by a prefill worker's prefix cache
    completion_tokens: int = 0
    wall_s: float = 0.0
    ttft_s: list[float] = field(default_factory=list)
    tpot_s: list[float] = field(default_factory=list)
    kv_blocks_leaked: int | None = None  # blocks still held on decode workers after the batch: must be 0

    def as_dict(self) -> dict[str, Any]:
        mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
        return {"output": self.output_path, "lines": self.lines, "succeeded": self.succeeded,
                "failed": self.failed, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "wall_s": round(self.wall_s, 3),
                "output_tok_per_s": round(self.completion_tokens / self.wall_s, 2) if self.wall_s else None,
                "mean_ttft_s": mean(self.ttft_s), "mean_tpot_s": mean(self.tpot_s),
                "kv_blocks_leaked": self.kv_blocks_leaked, "cached_tokens": self.cached_tokens,
                "prefix_cache_hit_rate": (round(self.cached_tokens / self.prompt_tokens, 4)
                                          if self.prompt_tokens else None)}

    def render(self) -> str:
        d = self.as_dict()
        fmt = lambda x: "n/a" if x is None else f"{x * 1000:.0f} ms"  # noqa: E731
        leaked = "not checked (shared deployment)" if d["kv_blocks_leaked"] is None else d["kv_blocks_leaked"]
        resumed = f" ({self.resumed} done by an earlier run)" if self.resumed else ""
        return (f"{d['lines']} requests{resumed}: {d['succeeded']} succeeded, {d['failed']} failed "
                f"in {d['wall_s']:.1f} s\n"
                f"tokens: {d['prompt_tokens']} prompt, {d['completion_tokens']} completion "
                f"({d['output_tok_per_s']} output tok/s)\n"
                f"prefix cache: {d['cached_tokens']} prompt tokens cached "
                f"(hit rate {0.0 if d['prefix_cache_hit_rate'] is None else d['prefix_cache_hit_rate']:.1%})\n"
                f"mean TTFT {fmt(d['mean_ttft_s'])}, mean TPOT {fmt(d['mean_tpot_s'])}, "
                f"KV blocks leaked {leaked}\n"
                f"results: {d['output']}")


class _Output:
    """Writes and flushes one line per finished request, then journals it; keeps the summary."""

    def __init__(self, stream: TextIO, tokenizer: Any, model_name: str, summary: BatchSummary,
                 journal: Journal, slo: SLO, collector: MetricsCollector | None) -> None:
        self.stream, self.tokenizer, self.model_name = stream, tokenizer, model_name
        self.summary, self.journal, self.slo, self.collector = summary, journal, slo, collector

    def write(self, record: dict[str, Any]) -> None:
        self.stream.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.stream.flush()
        self.journal.record(record["pdserve"]["line"])
        ttft_ok, tpot_ok = from_record(record).meets(self.slo)
        self.summary.within_slo += ttft_ok and tpot_ok
        if self.collector is not None:
            self.collector.record(record)

    def error(self, custom_id: str | None, line: int, code: str, message: str) -> None:
        self.write(error_record(custom_id, line, code, message))
        self.summary.failed += 1

    def finished(self, req: Request) -> None:
        s = self.summary
        if req.state == State.DONE:
            self.write(success_record(req, self.tokenizer, self.model_name))
            s.succeeded += 1
            s.prompt_tokens += req.prompt_len
            s.cached_tokens += req.cached_tokens
            s.completion_tokens += len(req.output_token_ids)
            t = req.timeline
            s.ttft_s.append(t.first_token - t.queued)
            if len(req.output_token_ids) > 1:
                s.tpot_s.append((t.finish - t.first_token) / (len(req.output_token_ids) - 1))
        else:
            self.write(error_record(req.custom_id, req.line, "request_failed", req.error or "failed", req))
            s.failed += 1


def run_batch(input_path: Path, output_path: Path, engine: EngineConfig, cluster: ClusterConfig,
              router_config: RouterConfig, options: BatchOptions,
              on_tick: Callable[[RouterAPI], None] | None = None,
              collector: MetricsCollector | None = None, deployment: str | None = None) -> BatchSummary:
    """Serve every line of `input_path`, appending one output line per input line to `output_path`.

    Resumable: rerun after an interruption with the same arguments and only the unfinished lines run.
    With `deployment`, requests go to that running deployment (`pdserve up`) instead of new workers.
    `on_tick` is called after every router step (progress hooks, fault drills in tests)."""
    check_paths(input_path, output_path)
    _check_has_requests(input_path)
    tokenizer, name, limits = model_limits(engine, options.default_max_tokens, options.ignore_eos)
    summary = BatchSummary(output_path=str(output_path))
    journal = Journal.for_output(output_path)
    journal.open(output_path, input_identity(input_path), _result_options(engine, options), options.resume)
    summary.resumed = len(journal.done)
    if journal.complete:
        journal.close()
        summary.lines = summary.resumed
        return summary
    backend = Backend.open(engine, cluster, router_config, deployment)
    start = time.time()
    try:
        with StopSignals() as stop, open(output_path, "a", encoding="utf-8") as out_stream:
            out = _Output(out_stream, tokenizer, name, summary, journal, options.slo, collector)
            router = backend.make_router(out.finished, on_prefill_batch=collector.prefill_batch if collector else None)
            driver = _Driver(router, stop, summary, options, collector, on_tick)
            driver.submit_lines(input_path, tokenizer, limits, out, journal)
            driver.run_to_end()
            # A shared deployment may be serving other clients: only a private cluster can be checked.
            if backend.workers is not None:
                router.drain()
                summary.kv_blocks_leaked = leaked_blocks(backend.workers)
            out_stream.flush()
            os.fsync(out_stream.fileno())  # every line durable before the journal says the batch is complete
            journal.finish()
            if collector:
                collector.refresh(router, every_s=0)
                collector.finished = True
    finally:
        summary.wall_s = time.time() - start
        journal.close()
        backend.close()
    return summary


def _check_has_requests(input_path: Path) -> None:
    with open(input_path, "rb") as f:
        if not any(line.strip() for line in iter(lambda: f.readline(1 << 20), b"")):
            raise ValueError(f"input file {input_path} holds no requests")


class _Driver:
    """Turns the router while the input's lines are submitted (at most `max_pending` in flight) and then
    until every request has finished; each turn also checks for Ctrl-C and updates progress and metrics."""

    def __init__(self, router: RouterAPI, stop: StopSignals, summary: BatchSummary, options: BatchOptions,
                 collector: MetricsCollector | None, on_tick: Callable[[RouterAPI], None] | None) -> None:
        self.router, self.stop, self.summary, self.options = router, stop, summary, options
        self.collector, self.on_tick = collector, on_tick
        self.progress = _Progress(summary, router) if options.progress else None

    def tick(self) -> None:
        self.stop.check()
        self.router.tick()
        if self.progress:
            self.progress.update()
        if self.collector:
            self.collector.refresh(self.router)
        if self.on_tick:
            self.on_tick(self.router)

    def submit_lines(self, input_path: Path, tokenizer: Any, limits: ModelLimits, out: _Output,
                     journal: Journal) -> None:
        seen: set[str] = set()
        with open(input_path, "rb") as f:
            for number, raw in iter_lines(f, MAX_LINE_BYTES):
                self.summary.lines += 1
                if number in journal.done:  # finished in an earlier, interrupted run
                    _remember_custom_id(raw, seen)
                    continue
                parsed = parse_line(number, raw, tokenizer, limits, seen)
                if parsed.error is not None:
                    out.error(parsed.custom_id, number, parsed.error.code, str(parsed.error))
                    continue
                self.router.submit(parsed.request)
                while len(self.router.active) >= self.options.max_pending:
                    self.tick()

    def run_to_end(self) -> None:
        while not self.router.done:
            self.tick()
        if self.progress:
            self.progress.close()


def _result_options(engine: EngineConfig, options: BatchOptions) -> dict[str, Any]:
    """What shapes the results: a journal written under other values must not be resumed."""
    return {"model": engine.model, "dtype": engine.dtype, "default_max_tokens": options.default_max_tokens,
            "ignore_eos": options.ignore_eos}


def _remember_custom_id(raw: bytes | None, seen: set[str]) -> None:
    try:
        cid = json.loads(raw or b"").get("custom_id")
    except (ValueError, AttributeError):
        return
    if isinstance(cid, str):
        seen.add(cid)


class _Progress:
    """One self-overwriting status line on stderr."""

    def __init__(self, summary: BatchSummary, router: RouterAPI) -> None:
        self.summary, self.router = summary, router
        self.start = time.time()
        self.last = 0.0
        self.tty = sys.stderr.isatty()

    def update(self, force: bool = False) -> None:
        now = time.time()
        if not force and now - self.last < (0.5 if self.tty else 10.0):
            return
        self.last = now
        s = self.summary
        done = s.succeeded + s.failed
        elapsed = max(now - self.start, 1e-9)
        states = self.router.snapshot()["states"]
        share = f" ({s.within_slo / s.succeeded:.0%} within SLO)" if s.succeeded else ""
        line = (f"{done}/{s.lines} done ({s.failed} failed) | {s.completion_tokens / elapsed:.1f} output tok/s | "
                f"goodput {s.within_slo / elapsed:.2f} req/s{share} | "
                + " ".join(f"{k}={v}" for k, v in sorted(states.items())))
        sys.stderr.write(("\r" + line + "\x1b[K") if self.tty else line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        self.update(force=True)
        if self.tty:
            sys.stderr.write("\n")
