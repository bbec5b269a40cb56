"""`pdserve run-batch`: an offline OpenAI-format batch through the disaggregated cluster.

Input is streamed: lines are parsed and submitted while earlier requests are
served, and at most `max_pending` requests are held at once. Output lines
are written and flushed as requests finish, so a long batch shows progress
on disk and memory stays bounded.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from engine.config import EngineConfig, ModelArch
from engine.loader import load_hf_config, load_tokenizer, model_display_name, resolve_model
from router.batch_io import BatchLimits, check_paths, error_record, iter_lines, parse_line, success_record
from router.cluster import ClusterConfig, start_workers, stop_workers
from router.request import Request, State
from router.router import Router, RouterConfig


@dataclass(frozen=True)
class BatchOptions:
    default_max_tokens: int = 512
    ignore_eos: bool = False
    max_pending: int = 4096  # requests held in memory (queued or running) at once
    progress: bool = True


@dataclass
class BatchSummary:
    output_path: str
    lines: int = 0
    succeeded: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    wall_s: float = 0.0
    ttft_s: list[float] = field(default_factory=list)
    tpot_s: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
        return {"output": self.output_path, "lines": self.lines, "succeeded": self.succeeded,
                "failed": self.failed, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "wall_s": round(self.wall_s, 3),
                "output_tok_per_s": round(self.completion_tokens / self.wall_s, 2) if self.wall_s else None,
                "mean_ttft_s": mean(self.ttft_s), "mean_tpot_s": mean(self.tpot_s)}

    def render(self) -> str:
        d = self.as_dict()
        fmt = lambda x: "n/a" if x is None else f"{x * 1000:.0f} ms"  # noqa: E731
        return (f"{d['lines']} requests: {d['succeeded']} succeeded, {d['failed']} failed in {d['wall_s']:.1f} s\n"
                f"tokens: {d['prompt_tokens']} prompt, {d['completion_tokens']} completion "
                f"({d['output_tok_per_s']} output tok/s)\n"
                f"mean TTFT {fmt(d['mean_ttft_s'])}, mean TPOT {fmt(d['mean_tpot_s'])}\n"
                f"results: {d['output']}")


class _Output:
    """Writes and flushes one line per finished request; keeps the summary."""

    def __init__(self, stream: TextIO, tokenizer: Any, model_name: str, summary: BatchSummary) -> None:
        self.stream, self.tokenizer, self.model_name, self.summary = stream, tokenizer, model_name, summary

    def write(self, record: dict[str, Any]) -> None:
        self.stream.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.stream.flush()

    def finished(self, req: Request) -> None:
        s = self.summary
        if req.state == State.DONE:
            self.write(success_record(req, self.tokenizer, self.model_name))
            s.succeeded += 1
            s.prompt_tokens += req.prompt_len
            s.completion_tokens += len(req.output_token_ids)
            t = req.timeline
            s.ttft_s.append(t["first_token"] - t["queued"])
            if len(req.output_token_ids) > 1:
                s.tpot_s.append((t["finish"] - t["first_token"]) / (len(req.output_token_ids) - 1))
        else:
            self.write(error_record(req.custom_id, req.line, "request_failed", req.error or "failed", req))
            s.failed += 1


def run_batch(input_path: Path, output_path: Path, engine: EngineConfig, cluster: ClusterConfig,
              router_config: RouterConfig, options: BatchOptions) -> BatchSummary:
    check_paths(input_path, output_path)
    with open(input_path, "rb") as f:
        if not any(line.strip() for line in iter(lambda: f.readline(1 << 20), b"")):
            raise ValueError(f"input file {input_path} holds no requests")
    folder = resolve_model(engine.model, engine.cache_dir)  # convert a GGUF once, before workers start
    tokenizer = load_tokenizer(folder)
    arch = ModelArch.from_hf(load_hf_config(folder))
    name = model_display_name(engine.model)
    limits = BatchLimits(max_context=arch.max_position_embeddings,
                         model_names=tuple(dict.fromkeys([name, str(engine.model or name)])),
                         default_max_tokens=options.default_max_tokens, ignore_eos=options.ignore_eos)
    summary = BatchSummary(output_path=str(output_path))
    workers = start_workers(engine, cluster)
    start = time.time()
    try:
        with open(output_path, "w", encoding="utf-8") as out_stream:
            out = _Output(out_stream, tokenizer, name, summary)
            router = Router(workers, router_config, on_finished=out.finished)
            progress = _Progress(summary, router) if options.progress else None
            seen: set[str] = set()
            with open(input_path, "rb") as f:
                for number, raw in iter_lines(f, limits.max_line_bytes):
                    summary.lines += 1
                    parsed = parse_line(number, raw, tokenizer, limits, seen)
                    if parsed.error is not None:
                        out.write(error_record(parsed.custom_id, number, parsed.error.code, str(parsed.error)))
                        summary.failed += 1
                        continue
                    router.submit(parsed.request)
                    while len(router.active) >= options.max_pending:
                        router.tick()
                        progress and progress.update()
            while not router.done:
                router.tick()
                progress and progress.update()
            progress and progress.close()
    finally:
        summary.wall_s = time.time() - start
        stop_workers(workers)
    return summary


class _Progress:
    """One self-overwriting status line on stderr."""

    def __init__(self, summary: BatchSummary, router: Router) -> None:
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
        line = (f"{done}/{s.lines} done ({s.failed} failed) | {s.completion_tokens / elapsed:.1f} output tok/s | "
                f"{s.succeeded / elapsed:.2f} req/s | " + " ".join(f"{k}={v}" for k, v in sorted(states.items())))
        sys.stderr.write(("\r" + line + "\x1b[K") if self.tty else line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        self.update(force=True)
        if self.tty:
            sys.stderr.write("\n")
