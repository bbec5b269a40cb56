"""Prefix caching on vs off, in one run.

    python -m pdserve.bench.prefix_caching [--headers 4 --header-tokens 1000 --questions 16 --dtype float32]
    python -m pdserve.bench.prefix_caching --workload default [--dtype bfloat16] [--prefill-cpu-only]

Runs the same batch through pdserve twice (--no-enable-prefix-caching, then --enable-prefix-caching) and
prints prefill tokens computed, KV bytes transferred, mean TTFT and throughput, each as on/off ratios,
and whether the greedy outputs are identical. `--workload default` is the throughput benchmark's
workload (no shared headers, only the chat template's system prompt in common): the check that caching
costs nothing where it hardly hits. It also times the prefill worker's compute both ways in this process,
batch by batch interleaved, as thread CPU time (steady on a shared machine, where wall time is not).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path

from engine.config import EngineConfig
from engine.loader import load_tokenizer, model_display_name, resolve_model
from pdserve.bench.workload import (
    SharedPrefixSpec,
    WorkloadSpec,
    make_shared_prefix_workload,
    make_workload,
    write_batch,
)


def _measure(batch: Path, out: Path, engine: EngineConfig, cluster) -> dict:
    from pdserve.batch.run import BatchOptions, run_batch
    from router.router import RouterConfig

    summary = run_batch(batch, out, engine, cluster, RouterConfig(max_prefill_tokens=engine.max_prefill_tokens),
                        BatchOptions(progress=False, resume=False))
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    ok = [r for r in recs if r["response"]]
    prompt = sum(r["response"]["body"]["usage"]["prompt_tokens"] for r in ok)
    cached = sum(r["pdserve"].get("cached_tokens", 0) for r in ok)
    return {"failed": summary.failed, "wall_s": summary.wall_s, "prompt_tokens": prompt,
            "computed_tokens": prompt - cached,
            "kv_bytes": sum(r["pdserve"]["kv_bytes"] for r in ok),
            "mean_ttft_s": sum(summary.ttft_s) / len(summary.ttft_s),
            "total_tok_s": (prompt + summary.completion_tokens) / summary.wall_s,
            "leaked": summary.kv_blocks_leaked,
            "outputs": {r["custom_id"]: r["pdserve"]["output_token_ids"] for r in ok}}


def prefill_cpu_time(prompts: list[list[int]], engine: EngineConfig, repeats: int = 3, print_fn=print) -> float:
    """Median over repeats of (prefill CPU time with caching) / (without), one thread, the prefill worker's
    own calls: packed `prefill` vs PrefillCache allocate + `extend` + commit, batches of max_prefill_tokens."""
    import statistics
    import time

    import torch

    from engine.runner import ModelRunner, model_fingerprint
    from prefill_worker.prefix_cache import PrefillCache

    torch.set_num_threads(1)
    runner = ModelRunner(replace(engine, device="cpu"))
    batches, cur = [], []
    for p in prompts:
        if cur and sum(map(len, cur)) + len(p) > engine.max_prefill_tokens:
            batches.append(cur)
            cur = []
        cur.append(p)
    batches.append(cur)

    def timed(fn, *args, **kwargs) -> float:
        start = time.thread_time()
        with torch.inference_mode():
            fn(*args, **kwargs)
        return time.thread_time() - start

    ratios = []
    for rep in range(repeats):
        cache = PrefillCache(runner, engine.prefill_cache_gib, model_fingerprint(runner.folder))
        off = on = 0.0
        for j, batch in enumerate(batches):
            ids = [f"{rep}-{j}-{i}" for i in range(len(batch))]
            off += timed(runner.prefill, batch, None)  # no KV sink either way: compute only
            start = time.thread_time()  # the cache's own bookkeeping counts too
            cached = cache.allocate(ids, batch)
            chunks, tables = [p[n:] for p, n in zip(batch, cached)], cache.tables(ids)
            on += time.thread_time() - start + timed(runner.extend, cache.pool, chunks, cached, tables,
                                                      kv_sink=None)
            start = time.thread_time()
            cache.commit(ids, batch)
            on += time.thread_time() - start
        ratios.append(on / off)
        print_fn(f"prefill CPU time, repeat {rep}: caching off {off:.2f} s, on {on:.2f} s ({on / off:.3f}); cached "
                 f"{cache.hit_tokens}/{cache.prompt_tokens} prompt tokens")
    return statistics.median(ratios)


def compare(spec: SharedPrefixSpec | WorkloadSpec, engine: EngineConfig, cluster, print_fn=print,
            prefill_cpu_only: bool = False) -> dict:
    tokenizer = load_tokenizer(resolve_model(engine.model, engine.cache_dir))
    if isinstance(spec, SharedPrefixSpec):
        requests = make_shared_prefix_workload(spec, tokenizer)
        print_fn(f"shared-prefix workload: {len(requests)} requests, {spec.num_headers} headers of "
                 f"~{spec.header_tokens} tokens, {sum(len(r.prompt_ids) for r in requests)} prompt tokens, "
                 f"{engine.dtype}")
    else:
        requests = make_workload(spec, tokenizer)
        print_fn(f"default workload: {len(requests)} requests, {sum(len(r.prompt_ids) for r in requests)} prompt "
                 f"tokens, {engine.dtype}")
        cpu = prefill_cpu_time([list(r.prompt_ids) for r in requests], engine, print_fn=print_fn)
        print_fn(f"prefill CPU time caching on/off: {cpu:.3f} (median)")
        if prefill_cpu_only:
            return {"prefill_cpu_ratio": cpu}
    runs = {}
    with tempfile.TemporaryDirectory(prefix="pdserve-prefix-") as tmp:
        batch = write_batch(requests, Path(tmp) / "batch.jsonl", model_display_name(engine.model))
        for caching in (False, True):
            runs[caching] = _measure(batch, Path(tmp) / f"out-{caching}.jsonl",
                                     replace(engine, enable_prefix_caching=caching), cluster)
            r = runs[caching]
            print_fn(f"caching {'on ' if caching else 'off'}: wall {r['wall_s']:.1f} s, computed {r['computed_tokens']}"
                     f"/{r['prompt_tokens']} prompt tokens, KV sent {r['kv_bytes'] / 2**20:.1f} MiB, mean TTFT "
                     f"{r['mean_ttft_s'] * 1000:.0f} ms, {r['total_tok_s']:.1f} total tok/s, failed {r['failed']}, "
                     f"KV blocks leaked {r['leaked']}")
    on, off = runs[True], runs[False]
    report = {"computed_share": on["computed_tokens"] / off["computed_tokens"],
              "kv_bytes_share": on["kv_bytes"] / off["kv_bytes"],
              "ttft_speedup": off["mean_ttft_s"] / on["mean_ttft_s"],
              "throughput_ratio": on["total_tok_s"] / off["total_tok_s"],
              "identical_outputs": sum(on["outputs"].get(k) == v for k, v in off["outputs"].items()),
              "requests": len(requests)}
    print_fn(f"prefix caching on/off: computed {report['computed_share']:.1%}, "
             f"KV bytes {report['kv_bytes_share']:.1%}, TTFT {report['ttft_speedup']:.2f}x lower, "
             f"throughput {report['throughput_ratio']:.2f}x; greedy outputs "
             f"identical {report['identical_outputs']}/{report['requests']}")
    return report


def main() -> None:
    from pdserve.runtime.cluster import ClusterConfig

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", choices=("shared-prefix", "default"), default="shared-prefix")
    p.add_argument("--prefill-cpu-only", action="store_true", help="default workload: only the prefill CPU-time A/B")
    p.add_argument("--headers", type=int, default=4)
    p.add_argument("--header-tokens", type=int, default=1000)
    p.add_argument("--questions", type=int, default=16, help="questions per header")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--transport", default="auto")
    p.add_argument("--prefill-workers", type=int, default=1)
    p.add_argument("--decode-workers", type=int, default=1)
    a = p.parse_args()
    spec = (WorkloadSpec() if a.workload == "default" else
            SharedPrefixSpec(num_headers=a.headers, header_tokens=a.header_tokens, questions_per_header=a.questions))
    compare(spec, EngineConfig(dtype=a.dtype, kv_cache_gib=1.0),
            ClusterConfig(num_prefill=a.prefill_workers, num_decode=a.decode_workers, transport=a.transport),
            prefill_cpu_only=a.prefill_cpu_only)


if __name__ == "__main__":
    main()
