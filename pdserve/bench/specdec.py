"""`pdserve bench specdec`: speculative decoding against plain decoding, in one process, same run.

The homework's Table 1 on what runs here: drafters × γ ∈ {2, 3, 5, 7} (+ auto) × batch sizes,
each measured as α, tokens per target forward and decode speedup over plain decoding of the same
prompts measured in the same run (at `--threads 1` in thread CPU time, steady on a shared machine;
otherwise wall time). The decode loop is the real one (ContinuousBatcher
with the SpeculativeStepper hooked in) over a real paged pool; prefill is outside the timing.
The workload asks the model to rewrite or summarize a given text, where the output copies its
input and prompt lookup (`ngram`) pays.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from decode_worker.batcher import ContinuousBatcher, DecodeSequence
from decode_worker.speculative import build_stepper, spec_summary
from decode_worker.stopping import StopChecker
from engine.config import SamplingParams
from engine.kv_cache import BlockManager, KVPool
from engine.runner import ModelRunner, pool_writer, token_slots
from engine.sampler import sample
from pdserve.bench.clock import bench_clock, clock_name


@dataclass
class Generation:
    outputs: list[list[int]]  # each request's output tokens, first (prefill) token included
    decode_s: float  # wall time of the decode loop
    rows: int  # Σ batch size over target forwards
    spec_steps: int = 0
    plain_steps: int = 0
    per_request: list[dict[str, Any] | None] = field(default_factory=list)

    @property
    def decode_tokens(self) -> int:
        return sum(len(o) - 1 for o in self.outputs)

    @property
    def alpha(self) -> float | None:
        """Accepted / drafted over all requests (the table's α)."""
        drafted = sum(r["drafted"] for r in self.per_request if r)
        return sum(r["accepted"] for r in self.per_request if r) / drafted if drafted else None


def generate(runner: ModelRunner, prompts: list[list[int]], params: list[SamplingParams], speculative: str = "off",
             num_tokens: int | str = "auto", tokenizer: Any | None = None, max_num_seqs: int | None = None,
             stepper_hook: Any | None = None) -> Generation:
    """Prefill `prompts` into a fresh pool, then decode them all with the decode worker's batcher
    (speculative or plain). Every KV block must come back (checked)."""
    bs = runner.config.block_size
    need = sum(-(-(len(p) + sp.max_tokens) // bs) for p, sp in zip(prompts, params))
    pool = KVPool.allocate(runner.kv_layout(num_blocks=need + 1), runner.config.device)
    blocks = BlockManager(need + 1, bs)
    tables = [blocks.allocate(str(i), len(p) + sp.max_tokens) for i, (p, sp) in enumerate(zip(prompts, params))]
    firsts: list[int] = []
    for lo in range(0, len(prompts), 16):  # prefill in slices: bounded activation memory
        chunk = prompts[lo:lo + 16]
        sink = pool_writer(pool, [token_slots(t, len(p), bs) for t, p in zip(tables[lo:lo + 16], chunk)])
        logits = runner.prefill(chunk, sink)
        firsts += sample(logits, params[lo:lo + 16], [0] * len(chunk)).tolist()
    stopper = StopChecker(runner.arch.eos_token_ids, tokenizer)
    batcher = ContinuousBatcher(runner, pool, stopper, max_num_seqs or len(prompts))
    batcher.enable_speculation(build_stepper(runner, pool, stopper, speculative, num_tokens))
    if stepper_hook is not None and batcher.speculative is not None:
        stepper_hook(batcher.speculative)
    seqs = [DecodeSequence(str(i), len(p), sp, tables[i], [firsts[i]], [time.time()],
                           prompt_token_ids=tuple(p)) for i, (p, sp) in enumerate(zip(prompts, params))]
    for s in seqs:
        batcher.add(s)
    clock = bench_clock()
    started = clock()
    plain_rows = 0
    while batcher.has_work():
        running = len(batcher.running) + len(batcher.waiting)
        batcher.step()
        if batcher.speculative is None:
            plain_rows += min(running, batcher.max_num_seqs)
    decode_s = clock() - started
    for i in range(len(prompts)):
        blocks.free(str(i))
    blocks.assert_empty()
    spec = batcher.speculative
    return Generation([s.output for s in seqs], decode_s, spec.rows if spec else plain_rows,
                      spec.spec_steps if spec else 0, spec.plain_steps if spec else 0,
                      [spec_summary(s) for s in seqs])


# ---- the benchmark -------------------------------------------------------------------------------
REWRITE_INSTRUCTIONS = (
    "Repeat the following passage word for word.",
    "Rewrite the following passage, keeping its sentences.",
    "Summarize the following passage, quoting it where you can.",
)


@dataclass(frozen=True)
class SpecBench:
    target: str | None = None  # HF folder or .gguf; None: the default model
    dtype: str = "auto"
    drafters: tuple[str, ...] = ("ngram", "layers:24")
    gammas: tuple[int | str, ...] = (2, 3, 5, 7, "auto")
    batch_sizes: tuple[int, ...] = (1, 8, 64)
    max_tokens: int = 48
    passage_tokens: int = 120  # words of corpus text per prompt (about as many tokens)
    num_threads: int = 0
    cache_dir: str | None = None


def rewrite_prompts(tokenizer: Any, n: int, passage_words: int, seed: int = 0, lead_words: int = 6) -> list[list[int]]:
    """n chat prompts asking to repeat/rewrite/summarize a passage of the bundled corpus. The assistant's
    turn starts with the passage's first `lead_words` words: a 135M model asked to repeat a text
    otherwise answers "The passage describes...", while the outputs this workload stands for (rewrite,
    extract, quote; larger models) copy long spans of their input."""
    import random

    from pdserve.bench.workload import CORPUS

    words = CORPUS.read_text().split()
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        start = rng.randrange(0, max(1, len(words) - passage_words))
        text = " ".join(words[start:start + passage_words])
        msg = f"{REWRITE_INSTRUCTIONS[i % len(REWRITE_INSTRUCTIONS)]}\n\n{text}"
        ids = tokenizer.apply_chat_template([{"role": "user", "content": msg}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)["input_ids"]
        lead = " ".join(words[start:start + lead_words])
        prompts.append(list(ids) + tokenizer.encode(lead, add_special_tokens=False))
    return prompts


def run(bench: SpecBench, out_svg: str | None = None, log: Any = None) -> dict[str, Any]:
    log = log or (lambda line: print(line, flush=True))  # rows as they are measured, even into a pipe
    from engine.config import EngineConfig
    from engine.loader import load_tokenizer

    kwargs: dict[str, Any] = {"model": bench.target, "dtype": bench.dtype, "num_threads": bench.num_threads,
                              "kv_cache_gib": 0.05, "enable_prefix_caching": False}
    if bench.cache_dir:
        kwargs["cache_dir"] = bench.cache_dir
    runner = ModelRunner(EngineConfig(**kwargs))
    tokenizer = load_tokenizer(runner.folder)
    rows: list[dict[str, Any]] = []
    for b in bench.batch_sizes:
        prompts = rewrite_prompts(tokenizer, b, bench.passage_tokens)
        params = [SamplingParams(max_tokens=bench.max_tokens, temperature=0, ignore_eos=True) for _ in prompts]
        generate(runner, prompts[:1], params[:1])  # warm-up (kernels, allocator)
        plain = generate(runner, prompts, params)
        plain_tps = plain.decode_tokens / plain.decode_s
        rows.append({"drafter": "off", "gamma": 0, "batch": b, "alpha": None, "tok_per_fwd": 1.0,
                     "tok_s": plain_tps, "speedup": 1.0, "exact": True})
        log(f"batch {b}: plain decode {plain_tps:.1f} tok/s")
        for drafter in bench.drafters:
            for g in bench.gammas:
                res = generate(runner, prompts, params, drafter, g)
                tps = res.decode_tokens / res.decode_s
                row = {"drafter": drafter, "gamma": g, "batch": b, "alpha": res.alpha,
                       "tok_per_fwd": res.decode_tokens / max(1, res.rows), "tok_s": tps, "speedup": tps / plain_tps,
                       "exact": res.outputs == plain.outputs}
                rows.append(row)
                log(format_row(row))
    report = {"machine": _machine(), "dtype": str(runner.config.dtype), "model": str(runner.folder),
              "clock": clock_name(),
              "max_tokens": bench.max_tokens, "rows": rows}
    if out_svg:
        from pathlib import Path

        Path(out_svg).write_text(speedup_svg(rows))
        report["svg"] = out_svg
    return report


def _machine() -> str:
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} cpus, torch threads {torch.get_num_threads()}"


def format_row(r: dict[str, Any]) -> str:
    alpha = "-" if r["alpha"] is None else f"{r['alpha']:.2f}"
    return (f"| {r['drafter']} | {r['gamma']} | {r['batch']} | {alpha} | {r['tok_per_fwd']:.2f} | {r['tok_s']:.1f} | "
            f"{r['speedup']:.2f}x | {'yes' if r['exact'] else 'NO'} |")


def table(report: dict[str, Any]) -> str:
    head = ("| drafter | γ | batch | α | tokens / target forward | decode tok/s | speedup vs plain | "
            "= plain |\n|---|---|---|---|---|---|---|---|")
    return "\n".join([head] + [format_row(r) for r in report["rows"]])


def speedup_svg(rows: list[dict[str, Any]], width: int = 640, height: int = 360) -> str:
    """Speedup vs γ, one line per (drafter, batch); `auto` drawn as a marker right of γ = 7."""
    pad, xs = 50, [2, 3, 5, 7, 9]
    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if r["drafter"] == "off":
            continue
        x = 9 if r["gamma"] == "auto" else int(r["gamma"])
        series.setdefault(f"{r['drafter']} b={r['batch']}", []).append((x, r["speedup"]))
    top = max([2.0] + [s for pts in series.values() for _, s in pts]) * 1.1
    sx = lambda x: pad + (x - 1) / 9 * (width - 2 * pad)  # noqa: E731
    sy = lambda y: height - pad - y / top * (height - 2 * pad)  # noqa: E731
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="11"><rect width="100%" height="100%" fill="white"/>',
           f'<line x1="{pad}" y1="{sy(1)}" x2="{width - pad}" y2="{sy(1)}" stroke="#999" stroke-dasharray="4"/>',
           f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="black"/>',
           f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="black"/>',
           f'<text x="{width / 2}" y="{height - 12}" text-anchor="middle">γ (draft tokens per step)</text>',
           f'<text x="14" y="{height / 2}" transform="rotate(-90 14 {height / 2})" text-anchor="middle">'
           'decode speedup over plain</text>']
    for x in xs:
        out.append(f'<text x="{sx(x)}" y="{height - pad + 14}" text-anchor="middle">{"auto" if x == 9 else x}</text>')
    for k in range(int(top) + 1):
        out.append(f'<text x="{pad - 6}" y="{sy(k) + 4}" text-anchor="end">{k}×</text>')
    for i, (name, pts) in enumerate(sorted(series.items())):
        c = colors[i % len(colors)]
        line = [(x, y) for x, y in pts if x != 9]
        out.append(f'<polyline fill="none" stroke="{c}" stroke-width="2" points="'
                   + " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in line) + '"/>')
        for x, y in pts:
            out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{c}"/>')
        out.append(f'<text x="{width - pad - 110}" y="{pad + 14 * i}" fill="{c}">{name}</text>')
    out.append("</svg>")
    return "\n".join(out)
