"""Prefix caching on vs off on the shared-prefix workload, in one run.

    python -m pdserve.bench.prefix_caching [--headers 4 --header-tokens 1000 --questions 16 --dtype float32]

Runs the same batch through pdserve twice (--no-enable-prefix-caching, then --enable-prefix-caching) and
prints prefill tokens computed, KV bytes transferred, mean TTFT and throughput, each as on/off ratios,
and whether the greedy outputs are identical.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path

from engine.config import EngineConfig
from engine.loader import load_tokenizer, model_display_name, resolve_model
from pdserve.bench.workload import SharedPrefixSpec, make_shared_prefix_workload, write_batch


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


def compare(spec: SharedPrefixSpec, engine: EngineConfig, cluster, print_fn=print) -> dict:
    tokenizer = load_tokenizer(resolve_model(engine.model, engine.cache_dir))
    requests = make_shared_prefix_workload(spec, tokenizer)
    print_fn(f"shared-prefix workload: {len(requests)} requests, {spec.num_headers} headers of ~{spec.header_tokens} "
             f"tokens, {sum(len(r.prompt_ids) for r in requests)} prompt tokens, {engine.dtype}")
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
    p.add_argument("--headers", type=int, default=4)
    p.add_argument("--header-tokens", type=int, default=1000)
    p.add_argument("--questions", type=int, default=16, help="questions per header")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--transport", default="auto")
    p.add_argument("--prefill-workers", type=int, default=1)
    p.add_argument("--decode-workers", type=int, default=1)
    a = p.parse_args()
    spec = SharedPrefixSpec(num_headers=a.headers, header_tokens=a.header_tokens, questions_per_header=a.questions)
    compare(spec, EngineConfig(dtype=a.dtype, kv_cache_gib=1.0),
            ClusterConfig(num_prefill=a.prefill_workers, num_decode=a.decode_workers, transport=a.transport))


if __name__ == "__main__":
    main()
