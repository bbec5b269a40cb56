"""`pdserve bench quant`: quantized weights against the float dtypes, in one run, on this machine.

Per setting (`float32`, `bfloat16`, `int8`, `w8a8` = int8 weights and activations, `int4`, `gguf` = the
file's own blocks; `+lmhead` also quantizes the LM head):
weight bytes; perplexity on heldout.txt; greedy agreement with bfloat16 over
benchmark prompts; decode tok/s at each batch size (min-max over repeats, the
machine may be shared). Quantized settings keep float32 activations, so their
perplexity measures the weights' error alone (their prefill path dequantizes to
float32); the bfloat16 row runs bfloat16 activations throughout.

heldout.txt is public-domain prose (Austen, Pride and Prejudice ch. 1; Lincoln,
the Gettysburg Address; the Declaration of Independence; Dickens, A Tale of Two
Cities; Melville, Moby-Dick), not the benchmark corpus. It is famous text, so
absolute perplexities are low; the figures to read are the ratios to float32.
The last line is
    quant int8_ppl_ratio=<x> int4_ppl_ratio=<y> int4_b1_speedup=<z>
(the best int4 / gguf decode at batch 1 over the best float dtype's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.attention import PrefillAttention
from engine.config import EngineConfig
from engine.kv_cache import BlockManager, KVPool
from engine.quant import weight_bytes
from engine.runner import ModelRunner, pool_writer, token_slots
from pdserve.bench.clock import bench_clock, clock_name

HELDOUT = Path(__file__).with_name("heldout.txt")
FLOAT_SETTINGS = ("float32", "bfloat16")


@dataclass(frozen=True)
class QuantBench:
    settings: tuple[str, ...] = ("float32", "bfloat16", "int8", "w8a8", "int4", "int4+lmhead", "gguf+lmhead")
    batch_sizes: tuple[int, ...] = (1, 64)
    decode_steps: int = 16
    repeats: int = 3
    num_prompts: int = 8  # greedy agreement
    agree_tokens: int = 32
    ppl_window: int = 512
    ppl_max_tokens: int = 0  # 0: the whole held-out text


def setting_config(engine: EngineConfig, setting: str) -> EngineConfig:
    """`float32` | `bfloat16` | `int8` | `w8a8` | `int4` | `gguf`, optionally `+lmhead`, as an EngineConfig (CPU)."""
    name, _, extra = setting.partition("+")
    if extra not in ("", "lmhead"):
        raise ValueError(f"setting {setting!r}: the only suffix is +lmhead")
    if name in FLOAT_SETTINGS:
        return replace(engine, dtype=name, quantization="none", quantize_lm_head=False, device="cpu")
    if name in ("int8", "w8a8", "int4", "gguf"):
        return replace(engine, dtype="float32", quantization=name, quantize_lm_head=extra == "lmhead", device="cpu")
    raise ValueError(f"unknown setting {setting!r}: float32, bfloat16, int8, w8a8, int4, gguf (+lmhead)")


@torch.inference_mode()
def perplexity(runner: ModelRunner, ids: list[int], window: int) -> float:
    """exp(mean NLL) over non-overlapping windows, every position scored."""
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start:start + window + 1]
        if len(chunk) < 2:
            break
        x = torch.tensor(chunk[:-1])
        logits = runner.model(x, torch.arange(len(x)), PrefillAttention([len(x)], None))
        nll += F.cross_entropy(logits.float(), torch.tensor(chunk[1:]), reduction="sum").item()
        count += len(x)
    return math.exp(nll / count)


class _Session:
    """Prompts prefilled into a fresh pool, ready for greedy decode steps."""

    def __init__(self, runner: ModelRunner, prompts: list[list[int]], max_new: int) -> None:
        self.runner = runner
        layout = runner.kv_layout(num_blocks=sum(-(-(len(p) + max_new) // runner.config.block_size)
                                                 for p in prompts) + 1)
        self.pool = KVPool.allocate(layout)
        blocks = BlockManager(layout.num_blocks, layout.block_size)
        tables = [blocks.allocate(str(i), len(p) + max_new) for i, p in enumerate(prompts)]
        bs = layout.block_size
        logits = runner.prefill(prompts, pool_writer(pool=self.pool, slot_lists=[
            token_slots(t, len(p), bs) for t, p in zip(tables, prompts)]))
        width = max(len(t) for t in tables)
        self.tables = torch.tensor([t + [0] * (width - len(t)) for t in tables])
        self.pos = torch.tensor([len(p) for p in prompts])
        self.out = [[t] for t in logits.argmax(-1).tolist()]

    def step(self) -> None:
        toks = torch.tensor([o[-1] for o in self.out])
        logits = self.runner.decode(self.pool, toks, self.pos, self.tables)
        self.pos = self.pos + 1
        for o, t in zip(self.out, logits.argmax(-1).tolist()):
            o.append(t)


def greedy(runner: ModelRunner, prompts: list[list[int]], n: int) -> list[list[int]]:
    s = _Session(runner, prompts, n)
    for _ in range(n - 1):
        s.step()
    return s.out


def decode_rates(runner: ModelRunner, prompt: list[int], batch: int, steps: int, repeats: int) -> list[float]:
    """Decode tok/s of `batch` sequences, one figure per repeat (after one warm-up step)."""
    s = _Session(runner, [prompt] * batch, 1 + (1 + steps) * repeats)
    s.step()
    rates = []
    for _ in range(repeats):
        clock = bench_clock()
        t = clock()
        for _ in range(steps):
            s.step()
        rates.append(batch * steps / (clock() - t))
    return rates


def agreement(ours: list[list[int]], ref: list[list[int]]) -> float:
    """Mean share of each greedy output that equals the reference before the first difference."""
    def prefix(a: list[int], b: list[int]) -> int:
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return sum(prefix(a, b) / len(b) for a, b in zip(ours, ref)) / len(ref)


def run(bench: QuantBench, engine: EngineConfig, print_fn=print) -> dict:
    from engine.loader import load_tokenizer, resolve_model
    from pdserve.bench.workload import WorkloadSpec, make_workload

    tokenizer = load_tokenizer(resolve_model(engine.model, engine.cache_dir))
    text_ids = tokenizer(HELDOUT.read_text())["input_ids"]
    if bench.ppl_max_tokens:
        text_ids = text_ids[:bench.ppl_max_tokens]
    prompts = [list(r.prompt_ids) for r in make_workload(
        WorkloadSpec(num_requests=bench.num_prompts, min_prompt=16, max_prompt=128, seed=1), tokenizer)]
    decode_prompt = text_ids[:32]
    order = ["bfloat16"] + [s for s in bench.settings if s != "bfloat16"]  # bf16 first: the agreement reference
    rows: dict[str, dict] = {}
    ref_out: list[list[int]] = []
    for setting in order:
        print_fn(f"[{setting}] loading ...")
        runner = ModelRunner(setting_config(engine, setting))
        row: dict = {"weight_bytes": weight_bytes(runner.model)}
        row["perplexity"] = perplexity(runner, text_ids, bench.ppl_window)
        out = greedy(runner, prompts, bench.agree_tokens)
        if setting == "bfloat16":
            ref_out = out
        row["greedy_agreement"] = agreement(out, ref_out)
        for b in bench.batch_sizes:
            row[f"decode_b{b}"] = decode_rates(runner, decode_prompt, b, bench.decode_steps, bench.repeats)
        if setting in bench.settings:
            rows[setting] = row
        del runner
    report = {"held_out_tokens": len(text_ids), "threads": torch.get_num_threads(), "clock": clock_name(),
              "settings": rows}
    report["last_line"] = _last_line(rows, bench.batch_sizes)
    print_fn(render(report, bench.batch_sizes))
    return report


def _last_line(rows: dict[str, dict], batch_sizes: tuple[int, ...]) -> str:
    parts = []
    base = rows.get("float32")
    for q in ("int8", "int4"):
        if base and q in rows:
            parts.append(f"{q}_ppl_ratio={rows[q]['perplexity'] / base['perplexity']:.4f}")
    floats = [s for s in FLOAT_SETTINGS if s in rows]
    b1 = f"decode_b{batch_sizes[0]}"
    int4 = [s for s in rows if s.startswith(("int4", "gguf"))]
    if floats and int4:
        best_float = max(max(rows[s][b1]) for s in floats)
        best_int4 = max(max(rows[s][b1]) for s in int4)
        parts.append(f"int4_b{batch_sizes[0]}_speedup={best_int4 / best_float:.2f}")
    return "quant " + " ".join(parts)


def render(report: dict, batch_sizes: tuple[int, ...]) -> str:
    rows = report["settings"]
    head = f"{'setting':<13} {'weight MB':>9} {'ppl':>8} {'vs fp32':>8} {'agree':>6}" + "".join(
        f" {'decode b' + str(b) + ' tok/s':>22}" for b in batch_sizes)
    lines = [f"perplexity over {report['held_out_tokens']} held-out tokens; decode min-max over repeats; "
             f"{report['threads']} torch threads, {report['clock']}", head]
    base = rows.get("float32", {}).get("perplexity")
    for name, r in rows.items():
        ratio = f"{r['perplexity'] / base:8.4f}" if base else f"{'-':>8}"
        rates = "".join(f" {min(r[f'decode_b{b}']):10.1f}-{max(r[f'decode_b{b}']):<11.1f}" for b in batch_sizes)
        lines.append(f"{name:<13} {r['weight_bytes'] / 1e6:9.1f} {r['perplexity']:8.3f} {ratio} "
                     f"{r['greedy_agreement']:6.2f}{rates}")
    lines.append(report["last_line"])
    return "\n".join(lines)
