"""`pdserve bench quant`: quantized weights against the float dtypes, in one run, on this machine.

Per setting (`float32`, `bfloat16`, `int8`, `w8a8` = int8 weights and activations, `int4`, `gguf` = the
file's own blocks; `+lmhead` also quantizes the LM head; `+kvint8` stores the KV cache as int8,
`--kv-cache-dtype int8`):
weight bytes; KV bytes per token (all layers, K and V, scales included); perplexity on heldout.txt
(for a `+kvint8` row scored through the int8 pool: every position attends to the quantized K/V of
the window, its own included, as a decode step does); greedy agreement with bfloat16 over
benchmark prompts; decode tok/s at each batch size (min-max over repeats, the
machine may be shared). Quantized settings keep float32 activations, so their
perplexity measures the weights' error alone (their prefill path dequantizes to
float32); the bfloat16 row runs bfloat16 activations throughout.

heldout.txt is public-domain prose (Austen, Pride and Prejudice ch. 1; Lincoln,
the Gettysburg Address; the Declaration of Independence; Dickens, A Tale of Two
Cities; Melville, Moby-Dick), not the benchmark corpus. It is famous text, so
absolute perplexities are low; the figures to read are the ratios to float32.
Settings served by our native int4 kernel (engine/quant/int4_kernel.py, which quantizes activations to
int8 per block of 32) are scored a second time with every matmul through that decode kernel
(`kernel ppl` below the table), since the prefill path the first figure uses dequantizes instead.
The last line is
    quant int8_ppl_ratio=<x> int4_ppl_ratio=<y> [int4_kernel_ppl_ratio=<k>] int4_b1_speedup=<z>
          [kv_int8_blocks=<b> kv_int8_ppl_ratio=<p> kv_int8_agree=<a>]
(the best int4 / gguf decode at batch 1 over the best float dtype's; for the first `+kvint8` row: the
blocks a pool of the same bytes holds vs its base setting's KV, perplexity over the base's scored the
same way through its float pool, and greedy agreement with the base, i.e. the same weights with the
model-dtype KV cache).
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
from engine.quant import QuantLinear, weight_bytes
from engine.quant.cpu import decode_path_for_all_rows
from engine.runner import ModelRunner, pool_writer, token_slots
from pdserve.bench.clock import bench_clock, clock_name

HELDOUT = Path(__file__).with_name("heldout.txt")
FLOAT_SETTINGS = ("float32", "bfloat16")


@dataclass(frozen=True)
class QuantBench:
    settings: tuple[str, ...] = ("float32", "bfloat16", "bfloat16+kvint8", "int8", "w8a8", "int4", "int4+lmhead",
                                 "gguf+lmhead")
    batch_sizes: tuple[int, ...] = (1, 64)
    decode_steps: int = 16
    repeats: int = 3
    num_prompts: int = 8  # greedy agreement
    agree_tokens: int = 32
    ppl_window: int = 512
    ppl_max_tokens: int = 0  # 0: the whole held-out text
    llamacpp: bool = False  # also decode the GGUF with llama.cpp (llama-cpp-python, if installed) at batch 1


def setting_config(engine: EngineConfig, setting: str) -> EngineConfig:
    """`float32` | `bfloat16` | `int8` | `w8a8` | `int4` | `gguf`, optionally `+lmhead` (not for a float dtype),
    `+kvint8` and `+bf16` (a quantized setting with bfloat16 activations around its quantized layers, as
    `--dtype auto` serves it on a CPU with bf16; default float32, so perplexity shows the weights' error
    alone), as an EngineConfig (CPU)."""
    name, *extras = setting.split("+")
    if any(e not in ("lmhead", "kvint8", "bf16") for e in extras) or len(set(extras)) != len(extras):
        raise ValueError(f"setting {setting!r}: the suffixes are +lmhead, +kvint8 and +bf16")
    kv = "int8" if "kvint8" in extras else "auto"
    if name in FLOAT_SETTINGS and "lmhead" not in extras and "bf16" not in extras:
        return replace(engine, dtype=name, quantization="none", quantize_lm_head=False, device="cpu",
                       kv_cache_dtype=kv)
    if name in ("int8", "w8a8", "int4", "gguf"):
        dtype = "bfloat16" if "bf16" in extras else "float32"
        return replace(engine, dtype=dtype, quantization=name, quantize_lm_head="lmhead" in extras, device="cpu",
                       kv_cache_dtype=kv)
    raise ValueError(f"unknown setting {setting!r}: float32, bfloat16, int8, w8a8, int4, gguf "
                     "(+lmhead, +kvint8, +bf16)")


def base_setting(setting: str) -> str:
    """The same weights with the model-dtype KV cache."""
    return "+".join(p for p in setting.split("+") if p != "kvint8")


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


@torch.inference_mode()
def paged_perplexity(runner: ModelRunner, ids: list[int], window: int) -> float:
    """As `perplexity`, but each window is stored in a KV pool of the runner's kv_cache_dtype and attended
    to from there (ModelRunner.extend from an empty prefix): what the KV cache's storage costs."""
    bs = runner.config.block_size
    pool = KVPool.allocate(runner.kv_layout(num_blocks=-(-window // bs)))
    table = list(range(pool.layout.num_blocks))
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start:start + window + 1]
        if len(chunk) < 2:
            break
        logits = runner.extend(pool, [chunk[:-1]], [0], [table], all_logits=True)
        nll += F.cross_entropy(logits.float(), torch.tensor(chunk[1:]), reduction="sum").item()
        count += len(chunk) - 1
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


def uses_int4_kernel(model: torch.nn.Module) -> bool:
    """True when some layer's decode runs our native int4 kernel (int8-quantized activations)."""
    return any(isinstance(m, QuantLinear) and getattr(m.kernel, "gemv", None) is not None for m in model.modules())


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
    for s in bench.settings:  # a +kvint8 row's base goes before it (its agreement reference), measured anyway
        if "kvint8" in s and base_setting(s) not in order[:order.index(s)]:
            order.insert(order.index(s), base_setting(s))
    rows: dict[str, dict] = {}
    outs: dict[str, list[list[int]]] = {}
    for setting in order:
        if setting in outs:
            continue
        print_fn(f"[{setting}] loading ...")
        runner = ModelRunner(setting_config(engine, setting))
        row: dict = {"weight_bytes": weight_bytes(runner.model),
                     "kv_bytes_per_token": runner.kv_layout(1).bytes_per_token}
        quantized_kv = runner.config.kv_cache_dtype != "auto"
        row["perplexity"] = (paged_perplexity if quantized_kv else perplexity)(runner, text_ids, bench.ppl_window)
        if uses_int4_kernel(runner.model) and not quantized_kv:
            with decode_path_for_all_rows():
                row["kernel_perplexity"] = perplexity(runner, text_ids, bench.ppl_window)
        out = outs[setting] = greedy(runner, prompts, bench.agree_tokens)
        row["greedy_agreement"] = agreement(out, outs["bfloat16"])
        if quantized_kv:
            row["kv_agreement"] = agreement(out, outs[base_setting(setting)])
        elif any("kvint8" in k and base_setting(k) == setting for k in bench.settings):  # the same path, float KV
            row["paged_perplexity"] = paged_perplexity(runner, text_ids, bench.ppl_window)
        for b in bench.batch_sizes:
            row[f"decode_b{b}"] = decode_rates(runner, decode_prompt, b, bench.decode_steps, bench.repeats)
        rows[setting] = row
        del runner
    wanted = set(bench.settings) | {base_setting(s) for s in bench.settings}
    rows = {s: r for s, r in rows.items() if s in wanted}  # bfloat16 is always measured (the reference)
    report = {"held_out_tokens": len(text_ids), "threads": torch.get_num_threads(), "clock": clock_name(),
              "settings": rows}
    if bench.llamacpp:
        report["llamacpp"] = _llamacpp_row(engine, decode_prompt, bench, print_fn)
    report["last_line"] = _last_line(rows, bench.batch_sizes)
    llama_b1 = report.get("llamacpp", {}).get("decode_b1")
    int4 = [s for s in rows if s.startswith(("int4", "gguf")) and "decode_b1" in rows[s]]
    if llama_b1 and int4:
        best = max(max(rows[s]["decode_b1"]) for s in int4)
        report["last_line"] += f" int4_vs_llamacpp_b1={best / max(llama_b1):.2f}"
    print_fn(render(report, bench.batch_sizes))
    return report


def _llamacpp_row(engine: EngineConfig, prompt: list[int], bench: QuantBench, print_fn) -> dict:
    from engine.loader import gguf_source
    from pdserve.bench import llamacpp

    version = llamacpp.available()
    if version is None:
        print_fn("llama.cpp: llama-cpp-python is not installed (pip install llama-cpp-python), no baseline row")
        return {"version": None}
    gguf = gguf_source(engine.model)
    rates = llamacpp.decode_rates(gguf, prompt, bench.decode_steps, bench.repeats, torch.get_num_threads())
    print_fn(f"llama.cpp {version} on {gguf.name}: decode b1 {min(rates):.1f}-{max(rates):.1f} tok/s")
    return {"version": version, "gguf": str(gguf), "decode_b1": rates}


def _last_line(rows: dict[str, dict], batch_sizes: tuple[int, ...]) -> str:
    parts = []
    base = rows.get("float32")
    for q in ("int8", "int4"):
        if base and q in rows:
            parts.append(f"{q}_ppl_ratio={rows[q]['perplexity'] / base['perplexity']:.4f}")
    if base and "kernel_perplexity" in rows.get("int4", {}):
        parts.append(f"int4_kernel_ppl_ratio={rows['int4']['kernel_perplexity'] / base['perplexity']:.4f}")
    floats = [s for s in FLOAT_SETTINGS if s in rows]
    b1 = f"decode_b{batch_sizes[0]}"
    int4 = [s for s in rows if s.startswith(("int4", "gguf"))]
    if floats and int4:
        best_float = max(max(rows[s][b1]) for s in floats)
        best_int4 = max(max(rows[s][b1]) for s in int4)
        parts.append(f"int4_b{batch_sizes[0]}_speedup={best_int4 / best_float:.2f}")
    kv = next((s for s in rows if "kvint8" in s), None)
    if kv is not None:
        base = rows[base_setting(kv)]
        parts += [f"kv_int8_blocks={base['kv_bytes_per_token'] / rows[kv]['kv_bytes_per_token']:.2f}",
                  f"kv_int8_ppl_ratio={rows[kv]['perplexity'] / base['paged_perplexity']:.4f}",
                  f"kv_int8_agree={rows[kv]['kv_agreement']:.2f}"]
    return "quant " + " ".join(parts)


def render(report: dict, batch_sizes: tuple[int, ...]) -> str:
    rows = report["settings"]
    head = f"{'setting':<18} {'weight MB':>9} {'KV B/tok':>8} {'ppl':>8} {'vs fp32':>8} {'agree':>6}" + "".join(
        f" {'decode b' + str(b) + ' tok/s':>22}" for b in batch_sizes)
    lines = [f"perplexity over {report['held_out_tokens']} held-out tokens; decode min-max over repeats; "
             f"{report['threads']} torch threads, {report['clock']}", head]
    base = rows.get("float32", {}).get("perplexity")
    for name, r in rows.items():
        ratio = f"{r['perplexity'] / base:8.4f}" if base else f"{'-':>8}"
        rates = "".join(f" {min(r[f'decode_b{b}']):10.1f}-{max(r[f'decode_b{b}']):<11.1f}" for b in batch_sizes)
        lines.append(f"{name:<18} {r['weight_bytes'] / 1e6:9.1f} {r['kv_bytes_per_token']:8d} "
                     f"{r['perplexity']:8.3f} {ratio} {r['greedy_agreement']:6.2f}{rates}")
    for name, r in rows.items():
        if "kernel_perplexity" in r:
            ratio = f" ({r['kernel_perplexity'] / base:.4f} x fp32)" if base else ""
            lines.append(f"{name}: kernel ppl {r['kernel_perplexity']:.3f}{ratio}, every matmul through the int4 "
                         "decode kernel (int8 activations per block of 32)")
    lines.append(report["last_line"])
    return "\n".join(lines)
