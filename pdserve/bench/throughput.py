"""`pdserve bench throughput`: pdserve against transformers on one workload, in one run.

For each dtype: transformers' `generate` in static batches, transformers'
continuous batching, pdserve (1 prefill + 1 decode worker by default),
optionally pdserve again on the generic path (`pdserve_generic`: --model-impl
transformers, the same model through transformers' modules) and, with
`--systems ...,vllm`, vLLM's CPU backend in its own Python (vllm_peer.py),
then a table of wall time, useful output tok/s, total tok/s, mean TTFT/TPOT,
the ratio of pdserve to each baseline, and the share of the compute bound
(matmul FLOP/s measured in this run / 2·active params: a mixture-of-experts
token uses its top-k experts only). The last line is
    throughput ratio_vs_hf_cb=<x> ratio_vs_hf_static=<y> roofline_share=<z> [ratio_native_vs_generic=<w>]
for the last dtype run (bf16 by default), plus `vllm_out_tok_s=<v> ratio_vs_vllm=<r>` when vllm was asked for.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from engine.config import EngineConfig
from engine.families import read_arch
from engine.loader import load_hf_config, load_tokenizer, model_display_name, resolve_model
from pdserve.bench.baselines import SystemResult, hf_continuous, hf_static
from pdserve.bench.workload import (
    SharedPrefixSpec,
    WorkloadSpec,
    make_shared_prefix_workload,
    make_workload,
    write_batch,
)
from router.router import RouterConfig

SYSTEMS = ("hf_static", "hf_cb", "pdserve", "pdserve_generic", "vllm")


@dataclass(frozen=True)
class ThroughputBench:
    workload: WorkloadSpec = WorkloadSpec()
    shared_prefix: SharedPrefixSpec | None = None  # --workload shared-prefix: replaces `workload`
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    systems: tuple[str, ...] = SYSTEMS[:3]  # pdserve_generic on request
    static_batch_size: int = 8
    baseline_threads: int = 0  # 0: all cores
    check_outputs: bool = True  # pdserve's greedy outputs vs the baselines'
    vllm_python: str | None = None  # vLLM's own Python (vllm_peer.py); None: PDSERVE_VLLM_PYTHON
    breakdown: bool = False  # split pdserve's makespan (breakdown.py): workers' stats read at the end


def matmul_flops(dtype: str, threads: int, m: int = 2048, k: int = 576, n: int = 1536, repeats: int = 20,
                 device: str = "cpu", hidden: int | None = None) -> float:
    """Best FLOP/s of a prefill-shaped matmul on this device, now (k = the model's hidden size)."""
    torch.set_num_threads(threads)
    dt = getattr(torch, dtype)
    k = hidden or k
    a, b = torch.randn(m, k, device=device).to(dt), torch.randn(k, 4 * k if hidden else n, device=device).to(dt)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * m * k * b.shape[1] / best


def _in_child(threads: int, fn, *args):
    torch.set_num_threads(threads)
    return fn(*args)


def _isolated(threads: int, fn, *args):
    """Run a baseline in a fresh process: its model, threads and any background thread it leaves
    behind (transformers' continuous batching keeps one) must not share this process with the next
    system. Measured: left in-process they cut the next system's speed by a third."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(_in_child, threads, fn, *args).result()


def run_pdserve(requests, batch_path: Path, engine: EngineConfig, cluster, dtype: str,
                router: RouterConfig | None = None, system: str = "pdserve",
                stats: list | None = None) -> SystemResult:
    """pdserve on the benchmark batch; `pdserve_generic` forces transformers' modules (--model-impl transformers).
    `stats`: when given, gets (prefill stats, step-loop stats) of the workers once every request finished."""
    from pdserve.batch.run import BatchOptions, run_batch

    out = batch_path.with_name(f"{system}-{dtype}.jsonl")
    router = router or RouterConfig(max_prefill_tokens=engine.max_prefill_tokens)
    impl = "transformers" if system == "pdserve_generic" else engine.model_impl

    def at_end(api) -> None:
        if stats is not None and api.done and not stats:
            stats.append(worker_stats(api.workers))

    summary = run_batch(batch_path, out, replace(engine, dtype=dtype, model_impl=impl), cluster, router,
                        BatchOptions(progress=False), on_tick=at_end)
    if summary.failed:
        raise RuntimeError(f"pdserve failed {summary.failed} benchmark requests; see {out}")
    result = SystemResult(system, dtype, summary.wall_s, summary.completion_tokens, summary.prompt_tokens,
                          summary.ttft_s, summary.tpot_s)
    for line in out.read_text().splitlines():
        rec = json.loads(line)
        result.outputs[rec["custom_id"]] = rec["pdserve"]["output_token_ids"]
    return result


def worker_stats(workers) -> tuple[list, list]:
    """Every worker's counters now: (prefill workers' PrefillStats, step loops' Decode/ColocatedStats)."""
    import ray

    prefill = ray.get([h.stats.remote() for h in workers.prefill.values()])
    return prefill, ray.get([h.stats.remote() for h in workers.decode.values()])


def run(bench: ThroughputBench, engine: EngineConfig, cluster, print_fn=print,
        router: RouterConfig | None = None) -> dict:
    import os

    folder = resolve_model(engine.model, engine.cache_dir)
    tokenizer = load_tokenizer(folder)
    arch = read_arch(load_hf_config(folder), engine.model_impl)
    params = arch.num_params(active=True)  # a token's FLOPs: a mixture-of-experts model uses its top-k experts only
    threads = bench.baseline_threads or os.cpu_count() or 1
    device = engine.resolved().device  # the baselines run where pdserve's workers run
    requests = (make_shared_prefix_workload(bench.shared_prefix, tokenizer) if bench.shared_prefix
                else make_workload(bench.workload, tokenizer))
    prompt_tokens = sum(len(r.prompt_ids) for r in requests)
    output_tokens = sum(r.max_tokens for r in requests)
    print_fn(f"workload: {len(requests)} requests, {prompt_tokens} prompt tokens "
             f"({min(len(r.prompt_ids) for r in requests)}-{max(len(r.prompt_ids) for r in requests)} each), "
             f"{output_tokens} output tokens ({min(r.max_tokens for r in requests)}-"
             f"{max(r.max_tokens for r in requests)} each), greedy, EOS ignored; {params / 1e6:.1f}M params; "
             f"device {device}")
    mode = getattr(cluster, "mode", "pd")
    if "pdserve" in bench.systems:
        workers = (f"{cluster.num_colocated} colocated worker(s), at most "
                   f"{cluster.max_num_batched_tokens or 'auto'} batched tokens per step" if mode == "colocated"
                   else f"{cluster.num_prefill} prefill + {cluster.num_decode} decode worker(s)")
        print_fn(f"pdserve --mode {mode}: {workers}")
    report: dict = {"workload": (bench.shared_prefix or bench.workload).__dict__, "params": params, "dtypes": {},
                    "mode": mode}
    ours: dict[str, dict[str, list[int]]] = {}  # pdserve's outputs per dtype
    with tempfile.TemporaryDirectory(prefix="pdserve-bench-") as tmp:
        batch_path = write_batch(requests, Path(tmp) / "workload.jsonl", model_display_name(engine.model))
        for dtype in bench.dtypes:
            flops = matmul_flops(dtype, threads, device=device,
                                 hidden=arch.hidden_size if device == "cuda" else None)
            bound = flops / (2 * params)
            results: dict[str, SystemResult] = {}
            for system in bench.systems:
                print_fn(f"[{dtype}] running {system} ...")
                if system == "hf_static":
                    results[system] = _isolated(threads, hf_static, folder, dtype, requests, bench.static_batch_size,
                                                 device)
                elif system == "hf_cb":
                    results[system] = _isolated(threads, hf_continuous, folder, dtype, requests, 3600, device)
                elif system in ("pdserve", "pdserve_generic"):
                    stats: list = []
                    results[system] = run_pdserve(requests, batch_path, engine, cluster, dtype, router, system,
                                                  stats if bench.breakdown and system == "pdserve" else None)
                    if stats:
                        report.setdefault("breakdown", {})[dtype] = _breakdown(results[system], stats[0], requests,
                                                                               engine.max_num_seqs, print_fn)
                elif system == "vllm":
                    skipped = _run_vllm(bench, folder, dtype, requests, engine, threads, results)
                    if skipped:
                        report.setdefault("skipped", {})[system] = skipped
                        print_fn(f"[{dtype}] vllm skipped: {skipped}")
                        continue
                r = results[system]
                print_fn(f"[{dtype}] {system}: {r.output_tok_s:.1f} output tok/s in {r.wall_s:.1f} s")
            report["dtypes"][dtype] = _summarize(results, flops, bound)
            report["dtypes"][dtype]["agreement"] = _agreement(results, requests) if bench.check_outputs else {}
            print_fn(render_table(dtype, report["dtypes"][dtype]))
            if "pdserve" in results:
                ours[dtype] = results["pdserve"].outputs
    if "float32" in ours and "bfloat16" in ours:
        same = sum(ours["float32"].get(r.custom_id) == ours["bfloat16"].get(r.custom_id) for r in requests)
        report["bf16_vs_fp32_agreement"] = same / len(requests)
        print_fn(f"pdserve greedy outputs, bf16 vs fp32: {same}/{len(requests)} requests identical "
                 f"({same / len(requests):.0%})")
    last = report["dtypes"][bench.dtypes[-1]]
    line = (f"throughput ratio_vs_hf_cb={_fmt(last.get('ratio_vs_hf_cb'))} "
            f"ratio_vs_hf_static={_fmt(last.get('ratio_vs_hf_static'))} "
            f"roofline_share={_fmt(last.get('roofline_share'), 4)}")
    if "ratio_native_vs_generic" in last:
        line += f" ratio_native_vs_generic={_fmt(last['ratio_native_vs_generic'])}"
    if "vllm" in bench.systems:
        vllm = last["rows"].get("vllm")
        line += (f" vllm_out_tok_s={_fmt(vllm['output_tok_s'], 1) if vllm else 'n/a'}"
                 f" ratio_vs_vllm={_fmt(last.get('ratio_vs_vllm'))}")
    report["last_line"] = line
    return report


def _run_vllm(bench: ThroughputBench, folder: Path, dtype: str, requests, engine: EngineConfig, cores: int,
              results: dict[str, SystemResult]) -> str | None:
    """vLLM's CPU backend on the same requests, in its own Python; the reason it was skipped, or None."""
    from pdserve.bench import vllm_peer

    try:
        peer = vllm_peer.find(bench.vllm_python)
        results["vllm"] = vllm_peer.run(peer, folder, dtype, requests, max_num_seqs=engine.max_num_seqs, cores=cores,
                                        kv_cache_gib=engine.kv_cache_gib)
    except vllm_peer.VllmUnavailable as e:
        return str(e)
    return None


def _breakdown(result: SystemResult, stats: tuple[list, list], requests, max_num_seqs: int, print_fn) -> dict:
    from pdserve.bench import breakdown

    b = breakdown.compute(result.wall_s, stats[0], stats[1], result.prompt_tokens,
                          [r.max_tokens for r in requests], max_num_seqs)
    print_fn(breakdown.render(b))
    return b.as_dict()


def _summarize(results: dict[str, SystemResult], flops: float, bound_tok_s: float) -> dict:
    rows = {}
    for name, r in results.items():
        rows[name] = {"wall_s": r.wall_s, "output_tok_s": r.output_tok_s, "total_tok_s": r.total_tok_s,
                      "mean_ttft_s": r.mean_ttft_s, "mean_tpot_s": r.mean_tpot_s,
                      "roofline_share": r.total_tok_s / bound_tok_s}
    out: dict = {"matmul_tflops": flops / 1e12, "compute_bound_tok_s": bound_tok_s, "rows": rows}
    if "pdserve" in results:
        p = results["pdserve"].output_tok_s
        for base in ("hf_cb", "hf_static", "vllm"):
            if base in results:
                out[f"ratio_vs_{base}"] = p / results[base].output_tok_s
        out["roofline_share"] = rows["pdserve"]["roofline_share"]
        if "pdserve_generic" in results:
            out["ratio_native_vs_generic"] = p / results["pdserve_generic"].output_tok_s
    return out


def _agreement(results: dict[str, SystemResult], requests) -> dict:
    """Share of requests whose greedy tokens equal between pdserve and each baseline."""
    if "pdserve" not in results:
        return {}
    ours = results["pdserve"].outputs
    agree = {}
    for name, r in results.items():
        if name != "pdserve" and r.outputs:
            same = sum(ours.get(q.custom_id) == r.outputs.get(q.custom_id) for q in requests)
            agree[name] = same / len(requests)
    return agree


def _fmt(x, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def render_table(dtype: str, d: dict) -> str:
    head = (f"\n{dtype}: matmul {d['matmul_tflops']:.2f} TFLOP/s measured -> compute bound "
            f"{d['compute_bound_tok_s']:.0f} tok/s\n")
    cols = ("system", "wall s", "out tok/s", "total tok/s", "TTFT ms", "TPOT ms", "x hf_cb", "x hf_static",
            "roofline")
    lines = [head, "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, row in d["rows"].items():
        vs_cb = row["output_tok_s"] / d["rows"]["hf_cb"]["output_tok_s"] if "hf_cb" in d["rows"] else None
        vs_st = row["output_tok_s"] / d["rows"]["hf_static"]["output_tok_s"] if "hf_static" in d["rows"] else None
        lines.append(f"| {name} | {row['wall_s']:.1f} | {row['output_tok_s']:.1f} | {row['total_tok_s']:.1f} | "
                     f"{row['mean_ttft_s'] * 1000:.0f} | {row['mean_tpot_s'] * 1000:.1f} | {_fmt(vs_cb)} | "
                     f"{_fmt(vs_st)} | {row['roofline_share']:.3f} |")
    if d.get("agreement"):
        lines.append("greedy agreement with pdserve: " +
                     ", ".join(f"{k} {v:.0%}" for k, v in d["agreement"].items()))
    return "\n".join(lines)
