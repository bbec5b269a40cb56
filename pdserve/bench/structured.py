"""`pdserve bench structured`: what a JSON schema costs in decode speed, and what it buys in valid answers.

In process (no Ray), with the decode worker's own batcher on the default model:

  * speed: at each batch size, decode steps of requests whose answers are long (a list of 12 objects),
    without a schema (EOS ignored) and with it, interleaved step by step (plain, schema with masks on
    the helper thread, plain, schema with masks filled inline, ...) so that every mode sees the same
    load; per mode the median step's wall ms and tok/s (rows / step time), the stepping thread's CPU
    ms (with the helper thread's fill CPU added, as if it ran in series) and the mask's costs: CPU ms
    filling the rows, ms the step waited for them, ms applying them;
  * validity: extraction requests (a sentence in, a JSON object with named keys out), greedy, run to
    their end with the schema and without it; the share of answers that parse and validate with
    `jsonschema` (and, without it, the share once code fences and text around the object are cut).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

ITEMS = {"type": "object", "properties": {"items": {
    "type": "array", "minItems": 12, "maxItems": 12, "items": {
        "type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                         "qty": {"type": "integer", "minimum": 1, "maximum": 99}},
        "required": ["name", "qty"], "additionalProperties": False}}},
    "required": ["items"], "additionalProperties": False}
CATEGORIES = ("grocery", "hardware", "office", "garden", "kitchen", "camping", "school", "bakery")

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 130},
                                           "city": {"type": "string", "maxLength": 40}},
          "required": ["name", "age", "city"], "additionalProperties": False}
PRODUCT = {"type": "object", "properties": {"product": {"type": "string", "maxLength": 40},
                                            "price": {"type": "number", "minimum": 0},
                                            "in_stock": {"type": "boolean"}},
           "required": ["product", "price", "in_stock"], "additionalProperties": False}
PEOPLE = (("Alice Johnson", 34, "Paris", "engineer"), ("Bob Smith", 52, "Denver", "baker"),
          ("Chen Wei", 27, "Shanghai", "nurse"), ("Dana Kovacs", 41, "Budapest", "pilot"),
          ("Emeka Obi", 63, "Lagos", "teacher"), ("Fatima Zahra", 19, "Rabat", "student"),
          ("Gustav Berg", 45, "Oslo", "architect"), ("Hana Sato", 38, "Osaka", "chef"))
PRODUCTS = (("wireless mouse", 24.99, True), ("desk lamp", 39.5, False), ("coffee grinder", 89.0, True),
            ("yoga mat", 19.95, True), ("backpack", 54.0, False), ("water bottle", 12.49, True),
            ("phone charger", 15.0, False), ("notebook", 3.75, True))


def extraction_tasks(n: int) -> list[tuple[str, dict]]:
    """n (question, schema) pairs: a sentence to extract a person or a product from."""
    tasks = []
    for i in range(n):
        if i % 2 == 0:
            name, age, city, job = PEOPLE[(i // 2) % len(PEOPLE)]
            text = f"{name} is a {age}-year-old {job} who lives in {city}."
            tasks.append((f"Extract the person's name, age and city from the text below. Answer only with a JSON "
                          f"object with the keys name, age and city.\n\nText: {text}", PERSON))
        else:
            product, price, stock = PRODUCTS[(i // 2) % len(PRODUCTS)]
            text = f"The {product} costs ${price} and is {'in stock' if stock else 'sold out'}."
            tasks.append((f"Extract the product, its price and whether it is in stock from the text below. Answer "
                          f"only with a JSON object with the keys product, price and in_stock.\n\nText: {text}",
                          PRODUCT))
    return tasks


@dataclass(frozen=True)
class StructuredBench:
    batch_sizes: tuple[int, ...] = (1, 16, 64)
    steps: int = 24  # interleaved plain steps timed (and as many schema steps, half per mask mode)
    validity_requests: int = 32
    max_tokens: int = 160
    dtype: str = "auto"
    num_threads: int = 0


def _prefill(runner: Any, grammars: Any, prompts: list[list[int]], params: list[Any]) -> tuple[Any, Any, list]:
    """Prefill into a fresh pool; first tokens sampled under each request's grammar. (pool, blocks, sequences)."""
    from decode_worker.batcher import DecodeSequence
    from engine.kv_cache import BlockManager, KVPool
    from engine.runner import pool_writer, token_slots
    from engine.sampler import sample
    from engine.structured.bitmask import MaskFiller

    bs = runner.config.block_size
    need = sum(-(-(len(p) + sp.max_tokens) // bs) for p, sp in zip(prompts, params)) + 1
    pool, blocks = KVPool.allocate(runner.kv_layout(num_blocks=need), runner.config.device), BlockManager(need, bs)
    tables = [blocks.allocate(str(i), len(p) + sp.max_tokens) for i, (p, sp) in enumerate(zip(prompts, params))]
    firsts: list[int] = []
    masks = MaskFiller(runner.arch.vocab_size)
    for lo in range(0, len(prompts), 16):
        chunk = prompts[lo:lo + 16]
        logits = runner.prefill(chunk, pool_writer(pool, [token_slots(t, len(p), bs)
                                                          for t, p in zip(tables[lo:lo + 16], chunk)]))
        pending = masks.begin([grammars.for_request(sp) for sp in params[lo:lo + 16]])
        if pending is not None:
            pending.apply(logits)
        firsts += sample(logits, params[lo:lo + 16], [0] * len(chunk)).tolist()
    seqs = [DecodeSequence(str(i), len(p), sp, tables[i], [firsts[i]], [time.time()])
            for i, (p, sp) in enumerate(zip(prompts, params))]
    for s in seqs:
        s.grammar = grammars.for_request(s.params, s.output)
    return pool, blocks, seqs


MODES = ("plain", "schema_helper", "schema_inline")


def interleaved_steps(runner: Any, grammars: Any, prompts: list[list[int]], steps: int) -> dict[str, dict]:
    """Per mode, the wall and stepping-thread CPU ms of each decode step, and the mask's costs per step.

    Two batchers over the same prompts, one without a schema (EOS ignored) and one with it, step in
    turn: plain, schema (masks on the helper thread), plain, schema (masks inline), ... so every mode
    sees the same load on a shared host, step for step. Every row runs through all steps."""
    from decode_worker.batcher import ContinuousBatcher
    from decode_worker.stopping import StopChecker
    from engine.config import SamplingParams
    from engine.structured.bitmask import MaskFiller
    from engine.structured.spec import Constraint

    batchers, fillers = {}, {"schema_helper": MaskFiller(runner.arch.vocab_size, overlap=True),
                             "schema_inline": MaskFiller(runner.arch.vocab_size, overlap=False)}
    for name, constraint in (("plain", None), ("schema", Constraint.json_schema(ITEMS))):
        params = [SamplingParams(max_tokens=steps + 64, temperature=0.8, seed=i, ignore_eos=constraint is None,
                                 constraint=constraint) for i in range(len(prompts))]
        pool, _, seqs = _prefill(runner, grammars, prompts, params)
        batchers[name] = ContinuousBatcher(runner, pool, StopChecker(runner.arch.eos_token_ids, None), len(prompts))
        for seq in seqs:
            assert batchers[name].add(seq) is None
        batchers[name].step()  # admits every row; not timed
    times: dict[str, list[tuple[float, float]]] = {m: [] for m in MODES}
    for k in range(steps):
        for mode in ("plain", "schema_helper" if k % 2 == 0 else "schema_inline"):
            batcher = batchers[mode.split("_")[0]]
            if mode != "plain":
                batcher.masks = fillers[mode]
            started, started_cpu = time.perf_counter(), time.thread_time()
            if batcher.step():
                raise RuntimeError("a sequence finished inside the timed steps: use a longer answer")
            times[mode].append((time.perf_counter() - started, time.thread_time() - started_cpu))
    out = {}
    for mode, samples in times.items():
        c = fillers[mode].counters if mode in fillers else None
        n = max(c.steps, 1) if c else 1
        out[mode] = {"step_ms": statistics.median(t for t, _ in samples) * 1e3,
                     "step_cpu_ms": statistics.median(u for _, u in samples) * 1e3,
                     "mask_fill_cpu_ms": c.fill_cpu_s / n * 1e3 if c else 0.0,
                     "mask_wait_ms": c.wait_s / n * 1e3 if c else 0.0,
                     "mask_apply_ms": c.apply_s / n * 1e3 if c else 0.0}
    for f in fillers.values():
        f.close()
    return out


def answers(runner: Any, grammars: Any, tokenizer: Any, tasks: list[tuple[str, dict]], constrained: bool,
            max_tokens: int) -> list[str]:
    """Greedy answers to the extraction tasks, run to their end."""
    from decode_worker.batcher import ContinuousBatcher
    from decode_worker.stopping import StopChecker
    from engine.config import SamplingParams
    from engine.structured.spec import Constraint

    prompts = [chat_ids(tokenizer, q) for q, _ in tasks]
    params = [SamplingParams(max_tokens=max_tokens, temperature=0,
                             constraint=Constraint.json_schema(s) if constrained else None) for _, s in tasks]
    pool, blocks, seqs = _prefill(runner, grammars, prompts, params)
    batcher = ContinuousBatcher(runner, pool, StopChecker(runner.arch.eos_token_ids, None), len(prompts))
    for s in seqs:
        batcher.add(s)
    while batcher.has_work():
        batcher.step()
    batcher.masks.close()
    return [tokenizer.decode(s.output, skip_special_tokens=True) for s in seqs]


def chat_ids(tokenizer: Any, question: str) -> list[int]:
    return list(tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                              tokenize=True, return_dict=True)["input_ids"])


def validates(text: str, schema: dict, lenient: bool = False) -> bool:
    import jsonschema

    if lenient:  # the outermost {...}: code fences and words around the object cut away
        start, end = text.find("{"), text.rfind("}")
        text = text[start:end + 1] if 0 <= start < end else text
    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def run(bench: StructuredBench) -> dict[str, Any]:
    from engine.config import EngineConfig
    from engine.loader import load_tokenizer
    from engine.runner import ModelRunner
    from engine.structured.grammars import Grammars

    runner = ModelRunner(EngineConfig(dtype=bench.dtype, num_threads=bench.num_threads, kv_cache_gib=0.05))
    tokenizer = load_tokenizer(runner.folder)
    grammars = Grammars(lambda: tokenizer, runner.arch.vocab_size, runner.arch.eos_token_ids)
    report: dict[str, Any] = {"bench": asdict(bench), "dtype": runner.config.dtype, "load_before": os.getloadavg(),
                              "speed": {}}
    for b in bench.batch_sizes:
        prompts = [chat_ids(tokenizer, f"List 12 {CATEGORIES[i % len(CATEGORIES)]} items with a quantity for each, "
                                       f"as JSON.") for i in range(b)]
        m = interleaved_steps(runner, grammars, prompts, bench.steps)
        plain = m["plain"]
        row = {"plain_tok_s": b / plain["step_ms"] * 1e3, "plain_step_ms": plain["step_ms"],
               "plain_step_cpu_ms": plain["step_cpu_ms"]}
        for mode in ("schema_helper", "schema_inline"):
            x = m[mode]
            # CPU: the stepping thread's, plus the helper thread's fill as if in series (the cost on a host whose
            # cores the forward already fills; what other processes do barely moves it).
            cpu = x["step_cpu_ms"] + (x["mask_fill_cpu_ms"] if mode == "schema_helper" else 0.0)
            row |= {f"{mode}_tok_s": b / x["step_ms"] * 1e3, f"{mode}_ratio": plain["step_ms"] / x["step_ms"],
                    f"{mode}_step_ms": x["step_ms"], f"{mode}_step_cpu_ms": cpu,
                    f"{mode}_ratio_cpu": plain["step_cpu_ms"] / cpu,
                    **{f"{mode}_{k}": v for k, v in x.items() if k.startswith("mask_")}}
        report["speed"][b] = row
    tasks = extraction_tasks(bench.validity_requests)
    free = answers(runner, grammars, tokenizer, tasks, False, bench.max_tokens)
    held = answers(runner, grammars, tokenizer, tasks, True, bench.max_tokens)
    n = len(tasks)
    report["validity"] = {
        "requests": n,
        "unconstrained_valid": sum(validates(a, s) for a, (_, s) in zip(free, tasks)) / n,
        "unconstrained_valid_lenient": sum(validates(a, s, lenient=True) for a, (_, s) in zip(free, tasks)) / n,
        "constrained_valid": sum(validates(a, s) for a, (_, s) in zip(held, tasks)) / n,
        "examples": {"unconstrained": free[:2], "constrained": held[:2]}}
    report["load_after"] = os.getloadavg()
    return report


def table(report: dict[str, Any]) -> str:
    lines = [f"dtype {report['dtype']}, {report['bench']['num_threads'] or 'default'} torch threads; load average "
             f"before {report['load_before'][0]:.1f}, after {report['load_after'][0]:.1f}; medians over "
             f"{report['bench']['steps']} interleaved steps (plain) and half as many per mask mode",
             "batch  mode            tok/s  step ms  ratio  | step CPU ms  ratio CPU  | fill CPU ms  wait ms  apply ms"]
    for b, s in report["speed"].items():
        lines.append(f"{b:>5}  plain          {s['plain_tok_s']:>6.1f}  {s['plain_step_ms']:>7.1f}   1.00  | "
                     f"{s['plain_step_cpu_ms']:>11.1f}       1.00  |")
        for mode in ("schema_helper", "schema_inline"):
            x = {k[len(mode) + 1:]: v for k, v in s.items() if k.startswith(mode)}
            lines.append(f"{b:>5}  {mode:<13} {x['tok_s']:>6.1f}  {x['step_ms']:>7.1f}  {x['ratio']:>5.2f}  | "
                         f"{x['step_cpu_ms']:>11.1f}  {x['ratio_cpu']:>9.2f}  | {x['mask_fill_cpu_ms']:>11.2f}  "
                         f"{x['mask_wait_ms']:>7.2f}  {x['mask_apply_ms']:>8.2f}")
    v = report["validity"]
    lines.append(f"valid answers of {v['requests']} extraction requests: without the schema "
                 f"{v['unconstrained_valid']:.0%} ({v['unconstrained_valid_lenient']:.0%} after cutting the text "
                 f"around the object), with it {v['constrained_valid']:.0%}")
    return "\n".join(lines)
