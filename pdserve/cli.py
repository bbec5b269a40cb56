"""The `pdserve` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from engine.config import DTYPE_CHOICES, DTYPE_NAMES, QUANTIZATIONS, EngineConfig
from kvtransfer.base import TRANSPORTS

if TYPE_CHECKING:
    from router.router import RouterConfig


def _engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and engine")
    g.add_argument("--model", default=None,
                   help="an HF folder, a .gguf file, or omit for the default SmolLM2-135M-Instruct")
    g.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="auto: bfloat16 on CUDA and on CPUs with native bf16 (AMX, AVX512-BF16), else float32")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: CUDA on workers that have a GPU, else CPU")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    g.add_argument("--kv-cache-gib", type=float, default=2.0, help="KV pool size per decode worker")
    g.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "int8"),
                   help="KV cache storage: auto (the model's dtype) or int8 (per-token-per-head scales: "
                        "~1.9x the blocks of bf16 in the same --kv-cache-gib, half the bytes moved)")
    g.add_argument("--max-num-seqs", type=int, default=128, help="decode batch limit")
    g.add_argument("--max-prefill-tokens", type=int, default=2048, help="prefill batch token budget")
    g.add_argument("--cache-dir", default=None, help="where converted weights are cached")
    g.add_argument("--speculative", default="off",
                   help="speculative decoding: off, ngram (prompt lookup), layers:K (the target's first K layers) "
                        "or model:PATH (a smaller model sharing the tokenizer)")
    g.add_argument("--num-speculative-tokens", default="auto", type=lambda v: v if v == "auto" else int(v),
                   help="draft tokens per step (γ), or auto: chosen each step from measured costs and acceptance")
    g.add_argument("--enforce-eager", action="store_true",
                   help="CUDA: run decode steps eagerly instead of replaying captured CUDA graphs")
    g.add_argument("--attention-backend", default="auto", choices=("auto", "torch", "cpu", "triton"),
                   help="auto: Triton kernels on CUDA, the native kernel on a CPU; torch: the reference path")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV of prompt prefixes already computed (prefill) or held (decode)")
    g.add_argument("--prefill-cache-gib", type=float, default=0.5,
                   help="each prefill worker's prefix-cache pool (with --enable-prefix-caching)")
    g.add_argument("--quantization", default="none", choices=QUANTIZATIONS,
                   help="quantize linear-layer weights at load (int8 symmetric, int4 asymmetric, group-wise; "
                        "w8a8: int8 weights and int8 activations per token, an int8 GEMM; "
                        "gguf: keep a GGUF's own Q4_0/Q4_1/Q8_0 blocks)")
    g.add_argument("--quant-group-size", type=int, default=0,
                   help="inputs per quantization scale; 0: int8 one per output channel, int4 32")
    g.add_argument("--quantize-lm-head", action="store_true", help="also quantize the LM head")


def _cluster_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster")
    g.add_argument("--address", default=None,
                   help="Ray cluster: omit to start a local one, 'auto' to join the running one, or ray://host:port")
    g.add_argument("--mode", default="pd", choices=("pd", "colocated"),
                   help="pd: prefill and decode workers, KV sent between them; colocated: workers that each "
                        "prefill (chunked, mixed into decode steps) and decode, the non-disaggregated baseline")
    g.add_argument("--prefill-workers", type=int, default=1)
    g.add_argument("--decode-workers", type=int, default=1)
    g.add_argument("--colocated-workers", type=int, default=1,
                   help="--mode colocated: workers that prefill and decode (they take the --decode-* resources)")
    g.add_argument("--max-num-batched-tokens", type=int, default=0,
                   help="--mode colocated: tokens per step, decode rows plus prefill chunks (0: 512 on a CPU, "
                        "2048 on CUDA; at least --max-num-seqs)")
    g.add_argument("--transport", default="auto", choices=TRANSPORTS,
                   help="KV transport; auto: shared memory on the same node, gRPC across nodes")
    g.add_argument("--prefill-threads", type=int, default=0, help="torch threads per prefill worker (0: auto)")
    g.add_argument("--decode-threads", type=int, default=0, help="torch threads per decode worker (0: auto)")
    g.add_argument("--transfer-timeout", type=float, default=60.0, help="deadline of one request's KV transfer (s)")
    g.add_argument("--call-timeout", type=float, default=120.0,
                   help="deadline of any one call to a worker (s); past it the worker is restarted")
    g.add_argument("--stall-timeout", type=float, default=60.0,
                   help="a decode worker whose loop has not turned for this long is restarted (s)")
    g.add_argument("--batch-admissions", default="auto", choices=("auto", "on", "off"),
                   help="hold prefilled requests until prefill is idle, then start decoding them together: fewer, "
                        "fuller decode steps when prefill and decode share CPU cores, at the cost of each "
                        "request's wait for decode. auto: on for run-batch, bench throughput and `up` deployments "
                        "when all workers share one CPU node; off for serve and bench serve (every request's "
                        "TPOT counts). serve --deployment uses what `up` was given")
    for role in ("prefill", "decode"):
        g.add_argument(f"--{role}-cpus", type=float, default=0.0, help=f"CPUs each {role} worker reserves")
        g.add_argument(f"--{role}-gpus", type=float, default=0.0, help=f"GPUs each {role} worker reserves")
        g.add_argument(f"--{role}-resources", default="",
                       help=f"custom Ray resources per {role} worker, e.g. {role}=1 (see deploy/)")
        g.add_argument(f"--{role}-labels", default="", help=f"node labels a {role} worker needs, e.g. role={role}")
    g.add_argument("--placement-strategy", default="SPREAD", choices=("PACK", "SPREAD", "STRICT_PACK",
                                                                       "STRICT_SPREAD"))
    g.add_argument("--tls-cert", default=None, help="PEM certificate of the KV endpoints (enables TLS)")
    g.add_argument("--tls-key", default=None, help="PEM private key for --tls-cert")
    g.add_argument("--tls-ca", default=None, help="PEM CA that signed --tls-cert (default: the cert itself)")


def router_config(args: argparse.Namespace, engine: EngineConfig) -> RouterConfig:
    """A server's router (`online_router`, set by serve and bench serve) admits eagerly under auto:
    holding admissions back would delay every stream."""
    from router.router import RouterConfig

    choice = getattr(args, "batch_admissions", "auto")
    online = getattr(args, "online_router", False)
    batch = {"on": True, "off": False}.get(choice, False if online else None)  # None: the router decides
    return RouterConfig(max_prefill_tokens=engine.max_prefill_tokens, call_timeout_s=args.call_timeout,
                        stall_timeout_s=args.stall_timeout, batch_admissions=batch)


def engine_config(args: argparse.Namespace) -> EngineConfig:
    kwargs = dict(model=args.model, dtype=args.dtype, device=args.device,
                  block_size=args.block_size, kv_cache_gib=args.kv_cache_gib, kv_cache_dtype=args.kv_cache_dtype,
                  max_num_seqs=args.max_num_seqs,
                  max_prefill_tokens=args.max_prefill_tokens, enforce_eager=args.enforce_eager,
                  attention_backend=args.attention_backend, enable_prefix_caching=args.enable_prefix_caching,
                  prefill_cache_gib=args.prefill_cache_gib,
                  quantization=args.quantization, quant_group_size=args.quant_group_size,
                  quantize_lm_head=args.quantize_lm_head, speculative=args.speculative,
                  num_speculative_tokens=args.num_speculative_tokens)
    if args.cache_dir:
        kwargs["cache_dir"] = args.cache_dir
    return EngineConfig(**kwargs)


def cluster_config(args: argparse.Namespace):
    from pdserve.runtime.cluster import ClusterConfig
    from proto.messages import TLSFiles

    tls = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        tls = TLSFiles(args.tls_cert, args.tls_key, args.tls_ca or args.tls_cert)
    from pdserve.runtime.cluster import WorkerResources

    roles = {role: WorkerResources.parse(getattr(args, f"{role}_cpus"), getattr(args, f"{role}_gpus"),
                                         getattr(args, f"{role}_resources"), getattr(args, f"{role}_labels"))
             for role in ("prefill", "decode")}
    if args.mode == "colocated" and getattr(args, "deployment", None):
        raise ValueError("--deployment serves a running deployment, which runs --mode pd; drop --mode colocated")
    return ClusterConfig(address=args.address, num_prefill=args.prefill_workers, num_decode=args.decode_workers,
                         transport=args.transport, prefill_threads=args.prefill_threads,
                         decode_threads=args.decode_threads, prefill=roles["prefill"], decode=roles["decode"],
                         placement_strategy=args.placement_strategy, transfer_timeout_s=args.transfer_timeout,
                         tls=tls, mode=args.mode, num_colocated=args.colocated_workers,
                         max_num_batched_tokens=args.max_num_batched_tokens)


def cmd_run_batch(args: argparse.Namespace) -> int:
    import signal

    from pdserve.runtime.cluster import check_address, process_age_s

    logging.getLogger("pdserve.cli").info("start-up: python and imports %.1f s", process_age_s())
    check_address(args.address)  # in seconds, before the model and tokenizer load
    from pdserve.batch.run import BatchOptions, run_batch
    from pdserve.observability.metrics import SLO

    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops as cleanly as Ctrl-C
    engine = engine_config(args)
    slo = SLO(ttft_s=args.slo_ttft, tpot_s=args.slo_tpot)
    collector = server = None
    if args.dashboard:
        from pdserve.observability.dashboard.collector import MetricsCollector
        from pdserve.observability.dashboard.server import DashboardServer

        collector = MetricsCollector(slo, title=f"pdserve: {Path(args.input).name}")
        server = DashboardServer(collector, host=args.dashboard_host, port=args.dashboard_port)
        print(f"dashboard: {server.url}  (Prometheus: {server.url}metrics)", file=sys.stderr)
    try:
        summary = run_batch(Path(args.input), Path(args.output), engine, cluster_config(args),
                            router_config(args, engine),
                            BatchOptions(default_max_tokens=args.default_max_tokens, ignore_eos=args.ignore_eos,
                                         progress=not args.quiet, resume=not args.no_resume, slo=slo),
                            collector=collector, deployment=args.deployment)
    except KeyboardInterrupt:
        print(f"pdserve: interrupted; finished lines are in {args.output}. Run the same command again to "
              "finish the rest.", file=sys.stderr)
        return 130
    finally:
        if server:
            server.stop()
    print(summary.render())
    if args.dashboard:
        from pdserve.observability.dashboard.report import write_report

        report = Path(args.output).with_suffix(".report.html")
        write_report(Path(args.output), report, slo)
        print(f"report: {report}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from pdserve.observability.metrics import SLO
    from pdserve.serve.admission import AdmissionConfig
    from pdserve.serve.server import ServeOptions, serve_forever

    engine = engine_config(args)
    options = ServeOptions(host=args.host, port=args.port, api_key=args.api_key,
                           admission=AdmissionConfig(args.admission, args.max_queue, args.admission_headroom),
                           slo=SLO(ttft_s=args.slo_ttft, tpot_s=args.slo_tpot),
                           default_max_tokens=args.default_max_tokens, request_timeout_s=args.request_timeout)
    if args.deployment and args.batch_admissions != "auto":
        raise ValueError(f"--batch-admissions {args.batch_admissions}: the deployment's router was configured "
                         f"by `pdserve up`; pass --batch-admissions there")
    serve_forever(engine, cluster_config(args), router_config(args, engine), options, deployment=args.deployment)
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from pdserve.observability.metrics import SLO
    from pdserve.runtime.deployment import DeploymentSpec, deploy

    engine = engine_config(args)
    if args.mode != "pd":
        raise ValueError("`pdserve up` deploys --mode pd only for now")
    spec = DeploymentSpec(name=args.name, engine=engine, cluster=cluster_config(args),
                          router=router_config(args, engine),
                          slo=SLO(ttft_s=args.slo_ttft, tpot_s=args.slo_tpot))
    actor = deploy(spec, args.address)
    _print_status(_ray_get(actor.status.remote()))
    print(f"deployment {args.name!r} is up; use it with `pdserve run-batch --deployment {args.name} ...`")
    return 0


def _ray_get(ref, timeout: float = 120):
    import ray

    return ray.get(ref, timeout=timeout)


def _print_status(st: dict) -> None:
    print(f"deployment {st['name']}: model {st['model']} ({st['dtype']}), up {st['uptime_s']:.0f} s, "
          f"{st['in_flight']} requests in flight, {st['queued']} queued")
    print(f"{'worker':<12} {'node':<16} {'pid':>8} {'device':<8} {'dtype':<9} {'threads':>7} {'KV blocks used':>16} "
          f"{'running':>8}")
    for w in sorted(st["workers"], key=lambda w: w["worker_id"]):
        kv = f"{w['num_blocks'] - w['free_blocks']}/{w['num_blocks']}" if "num_blocks" in w else "-"
        device = w["gpu"] or w["device"]
        print(f"{w['worker_id']:<12} {w['node_ip']:<16} {w['pid']:>8} {device:<8} {w.get('dtype', '-'):<9} "
              f"{w['threads']:>7} {kv:>16} {w.get('running', '-'):>8}")
    for cpu in sorted({w["cpu"] for w in st["workers"] if w.get("cpu")}):  # one line per kind of CPU
        print(cpu)


def cmd_status(args: argparse.Namespace) -> int:
    from pdserve.runtime.deployment import find

    _print_status(_ray_get(find(args.name, args.address).status.remote()))
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from pdserve.runtime.deployment import teardown

    teardown(args.name, args.address)
    print(f"deployment {args.name!r} stopped")
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    import time

    from pdserve.observability.dashboard.server import DashboardServer
    from pdserve.runtime.deployment import find

    actor = find(args.name, args.address)

    class Remote:  # the collector interface, answered by the deployment's router
        def state(self):
            return _ray_get(actor.dashboard_state.remote())

        def prometheus(self):
            return _ray_get(actor.prometheus.remote())

    server = DashboardServer(Remote(), host=args.dashboard_host, port=args.dashboard_port)
    print(f"dashboard of deployment {args.name!r}: {server.url}  (Prometheus: {server.url}metrics); Ctrl-C stops")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()
    return 0


def cmd_submit(args: argparse.Namespace, passthrough: list[str]) -> int:
    from pdserve.jobs import submit

    return submit(Path(args.input), Path(args.output), args.address, passthrough, python=args.python)


def cmd_report(args: argparse.Namespace) -> int:
    from pdserve.observability.dashboard.report import write_report
    from pdserve.observability.metrics import SLO

    state = write_report(Path(args.output_file), Path(args.o), SLO(ttft_s=args.slo_ttft, tpot_s=args.slo_tpot))
    s = state["summary"]
    print(f"{s['requests']} requests, goodput {s['goodput_rps']:.3f} req/s, SLO attainment "
          f"{(s['slo_attainment'] or 0):.1%} -> {args.o}")
    return 0


def _slo_args(p: argparse.ArgumentParser) -> None:
    from pdserve.observability.metrics import SLO

    g = p.add_argument_group("service-level objectives (goodput counts requests within both)")
    g.add_argument("--slo-ttft", type=float, default=SLO.ttft_s, help="time-to-first-token SLO, seconds")
    g.add_argument("--slo-tpot", type=float, default=SLO.tpot_s, help="time-per-output-token SLO, seconds")


def cmd_bench_throughput(args: argparse.Namespace) -> int:
    import json
    from dataclasses import replace

    from pdserve.bench.throughput import SYSTEMS, ThroughputBench, run
    from pdserve.bench.workload import NANOVLLM, SharedPrefixSpec, WorkloadSpec

    if args.quick:
        spec = WorkloadSpec(num_requests=4, min_prompt=16, max_prompt=64, min_output=2, max_output=6, seed=args.seed)
    elif args.workload == "nanovllm":
        spec = replace(NANOVLLM, seed=args.seed, num_requests=args.num_requests or NANOVLLM.num_requests)
    else:
        spec = WorkloadSpec(num_requests=args.num_requests or 64, seed=args.seed)
    systems = tuple(s for s in args.systems.split(",") if s)
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        raise ValueError(f"--systems takes {','.join(SYSTEMS)}; unknown: {','.join(sorted(unknown))}")
    shared = SharedPrefixSpec(seed=args.seed) if args.workload == "shared-prefix" and not args.quick else None
    bench = ThroughputBench(workload=spec, dtypes=tuple(args.dtypes.split(",")), systems=systems,
                            static_batch_size=args.static_batch_size, shared_prefix=shared)
    engine = engine_config(args)
    from engine.cpu_features import CpuInfo

    print(f"{CpuInfo.here().describe(f'auto -> {engine.resolved().dtype}')}; benchmarking {','.join(bench.dtypes)}")
    report = run(bench, engine, cluster_config(args), router=router_config(args, engine))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print(report["last_line"])
    return 0


def cmd_bench_kvtransfer(args: argparse.Namespace) -> int:
    from pdserve.bench.kvtransfer import KVBench, last_line, run

    tokens = (64, 512) if args.quick else tuple(int(t) for t in args.tokens.split(","))
    transports = tuple(t for t in args.transports.split(",") if t)
    from engine.cpu_features import CpuInfo

    print(CpuInfo.here().describe())
    report = run(KVBench(tokens=tokens, transports=transports, dtype=args.dtype, repeats=1 if args.quick else 3,
                         chunk_kib=args.chunk_kib))
    print(last_line(report, transports))
    return 0


def cmd_bench_quant(args: argparse.Namespace) -> int:
    import json

    from pdserve.bench.quant import QuantBench, run

    bench = QuantBench(settings=tuple(s for s in args.settings.split(",") if s),
                       batch_sizes=tuple(int(b) for b in args.batch_sizes.split(",")),
                       decode_steps=args.steps, repeats=args.repeats, llamacpp=args.llamacpp)
    if args.quick:
        bench = replace(bench, batch_sizes=(1, 4), decode_steps=2, repeats=1, num_prompts=2, agree_tokens=4,
                        ppl_max_tokens=128)
    kwargs = {"model": args.model, "num_threads": args.threads}
    if args.cache_dir:
        kwargs["cache_dir"] = args.cache_dir
    engine = EngineConfig(**kwargs)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    report = run(bench, engine)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print(report["last_line"])
    return 0


def cmd_bench_specdec(args: argparse.Namespace) -> int:
    import json
    from dataclasses import replace

    from pdserve.bench.specdec import SpecBench, run, table

    gammas = tuple(g if g == "auto" else int(g) for g in args.gammas.split(","))
    bench = SpecBench(target=args.target, dtype=args.dtype, drafters=tuple(args.drafters.split(",")), gammas=gammas,
                      batch_sizes=tuple(int(b) for b in args.batch_sizes.split(",")), max_tokens=args.max_tokens,
                      num_threads=args.threads, cache_dir=args.cache_dir)
    if args.quick:
        bench = replace(bench, gammas=(2, "auto"), batch_sizes=(2,), max_tokens=8, passage_tokens=40)
    report = run(bench, out_svg=args.svg)
    print(table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    best = max((r for r in report["rows"] if r["drafter"] != "off"), key=lambda r: r["speedup"])
    print(f"specdec best_speedup={best['speedup']:.2f} drafter={best['drafter']} gamma={best['gamma']} "
          f"batch={best['batch']} all_exact={all(r['exact'] for r in report['rows'])}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description="Disaggregated prefill/decode LLM serving on Ray")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    rb = sub.add_parser("run-batch", help="run an OpenAI-format JSONL batch (as `vllm run-batch` reads)")
    rb.add_argument("-i", "--input", required=True, help="input JSONL")
    rb.add_argument("-o", "--output", required=True, help="output JSONL (one line per input line)")
    rb.add_argument("--ignore-eos", action="store_true", help="generate max_tokens for every request (benchmarks)")
    rb.add_argument("--default-max-tokens", type=int, default=512,
                    help="max_tokens for requests that set none (KV is reserved for prompt + max_tokens)")
    rb.add_argument("-q", "--quiet", action="store_true", help="no progress line")
    rb.add_argument("--no-resume", action="store_true",
                    help="start over even if OUTPUT.journal shows an interrupted run of this batch")
    rb.add_argument("--dashboard", action="store_true",
                    help="serve the live per-stage dashboard and Prometheus /metrics while the batch runs, "
                         "and write OUTPUT.report.html at the end")
    rb.add_argument("--dashboard-host", default="127.0.0.1")
    rb.add_argument("--dashboard-port", type=int, default=8470)
    rb.add_argument("--deployment", default=None,
                    help="send the batch to this running deployment (`pdserve up`) instead of starting workers")
    _slo_args(rb)
    _engine_args(rb)
    _cluster_args(rb)
    rb.set_defaults(func=cmd_run_batch)

    sv = sub.add_parser("serve", help="serve the OpenAI API (chat, completions, streaming) over HTTP")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1 routes")
    sv.add_argument("--admission", default="always", choices=("always", "slo"),
                    help="slo: refuse at once (429 + Retry-After) a request whose predicted TTFT exceeds its SLO")
    sv.add_argument("--admission-headroom", type=float, default=0.8,
                    help="slo: admit while the predicted TTFT is within this share of the TTFT SLO")
    sv.add_argument("--max-queue", type=int, default=1024,
                    help="requests waiting for prefill at once; beyond it 503 + Retry-After")
    sv.add_argument("--request-timeout", type=float, default=600.0,
                    help="a request not finished after this many seconds is aborted (504)")
    sv.add_argument("--default-max-tokens", type=int, default=512,
                    help="max_tokens for requests that set none (KV is reserved for prompt + max_tokens)")
    sv.add_argument("--deployment", default=None,
                    help="serve through this running deployment (`pdserve up`) instead of starting workers")
    _slo_args(sv)
    _engine_args(sv)
    _cluster_args(sv)
    sv.set_defaults(func=cmd_serve, online_router=True)

    up = sub.add_parser("up", help="start a long-lived deployment (router + workers) on a running Ray cluster")
    up.add_argument("--name", default="pdserve", help="deployment name")
    _engine_args(up)
    _cluster_args(up)
    _slo_args(up)
    up.set_defaults(func=cmd_up, address_default="auto")

    for cmd, fn, text in (("status", cmd_status, "show a deployment's workers, nodes, devices and KV use"),
                          ("down", cmd_down, "stop a deployment")):
        p = sub.add_parser(cmd, help=text)
        p.add_argument("--name", default="pdserve")
        p.add_argument("--address", default="auto")
        p.set_defaults(func=fn)

    db = sub.add_parser("dashboard", help="serve the live dashboard of a running deployment")
    db.add_argument("--name", default="pdserve")
    db.add_argument("--address", default="auto")
    db.add_argument("--dashboard-host", default="127.0.0.1")
    db.add_argument("--dashboard-port", type=int, default=8470)
    db.set_defaults(func=cmd_dashboard)

    sb = sub.add_parser("submit", help="run a batch as a Ray Job; other options go to run-batch on the cluster",
                        epilog="Example: pdserve submit -i in.jsonl -o out.jsonl --address http://head:8265 "
                               "--deployment pdserve")
    sb.add_argument("-i", "--input", required=True)
    sb.add_argument("-o", "--output", required=True)
    sb.add_argument("--address", required=True, help="the Ray dashboard / job server, http://HEAD:8265")
    sb.add_argument("--python", default="python", help="the cluster's Python that has pdserve installed")
    sb.set_defaults(func=cmd_submit, passthrough=True)

    rp = sub.add_parser("report", help="write the dashboard's panels for a finished batch as one HTML file")
    rp.add_argument("output_file", help="a run-batch output JSONL")
    rp.add_argument("-o", required=True, help="the HTML report to write")
    _slo_args(rp)
    rp.set_defaults(func=cmd_report)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    tp = bench.add_parser("throughput", help="pdserve vs transformers (static and continuous batching)")
    tp.add_argument("--quick", action="store_true", help="4 short requests: checks the benchmark runs")
    tp.add_argument("--num-requests", type=int, default=0, help="default: the workload's own (64; nanovllm 256)")
    tp.add_argument("--workload", default="default", choices=("default", "nanovllm", "shared-prefix"),
                    help="default: 64 English prompts of 16-512 tokens, 16-256 output tokens; nanovllm: nano-vllm's "
                         "benchmark shape (256 requests, prompt and output lengths uniform in 100-1024); "
                         "shared-prefix: 4 headers of ~1,000 tokens, 64 short questions each")
    tp.add_argument("--seed", type=int, default=0)
    tp.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated; the last one makes the last line")
    tp.add_argument("--systems", default="hf_static,hf_cb,pdserve", help="comma-separated subset")
    tp.add_argument("--static-batch-size", type=int, default=8)
    tp.add_argument("--json", default=None, help="also write the full report here")
    _engine_args(tp)
    _cluster_args(tp)
    tp.set_defaults(func=cmd_bench_throughput)

    kv = bench.add_parser("kvtransfer", help="KV caches through each transport vs an in-memory copy")
    kv.add_argument("--tokens", default="1024,8192,32768", help="comma-separated cache sizes in tokens")
    kv.add_argument("--transports", default="shm,grpc")
    kv.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPE_NAMES))
    kv.add_argument("--quick", action="store_true", help="two small caches, one repeat")
    kv.add_argument("--chunk-kib", type=int, default=0, help="gRPC chunk size to try (0: the default)")
    kv.set_defaults(func=cmd_bench_kvtransfer)

    qb = bench.add_parser("quant", help="quantized weights and KV vs float: bytes, perplexity, agreement, decode tok/s")
    qb.add_argument("--settings", default="float32,bfloat16,bfloat16+kvint8,int8,w8a8,int4,int4+lmhead,gguf+lmhead",
                    help="comma-separated: float32, bfloat16, int8, w8a8, int4, gguf, each quantized one optionally "
                         "+lmhead; any optionally +kvint8 (--kv-cache-dtype int8)")
    qb.add_argument("--batch-sizes", default="1,64", help="decode batch sizes to time")
    qb.add_argument("--steps", type=int, default=16, help="timed decode steps per repeat")
    qb.add_argument("--repeats", type=int, default=3)
    qb.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's choice)")
    qb.add_argument("--model", default=None, help="as for run-batch; default SmolLM2-135M-Instruct")
    qb.add_argument("--cache-dir", default=None)
    qb.add_argument("--quick", action="store_true", help="tiny sizes: checks the benchmark runs")
    qb.add_argument("--llamacpp", action="store_true",
                    help="also decode the same GGUF with llama.cpp at batch 1 (needs llama-cpp-python installed)")
    qb.add_argument("--json", default=None, help="also write the full report here")
    qb.set_defaults(func=cmd_bench_quant)

    sd = bench.add_parser("specdec", help="speculative decoding: drafters x γ x batch size vs plain decoding")
    sd.add_argument("--target", default=None, help="HF folder or .gguf of the target; default SmolLM2-135M-Instruct")
    sd.add_argument("--dtype", default="auto", help="float32, bfloat16 or auto (the CPU's best)")
    sd.add_argument("--drafters", default="ngram,layers:24", help="comma-separated: ngram, layers:K, model:PATH")
    sd.add_argument("--gammas", default="2,3,5,7,auto", help="comma-separated γ values and/or auto")
    sd.add_argument("--batch-sizes", default="1,8,64")
    sd.add_argument("--max-tokens", type=int, default=48, help="greedy output tokens per request (EOS ignored)")
    sd.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's choice)")
    sd.add_argument("--cache-dir", default=None)
    sd.add_argument("--svg", default="specdec_speedup.svg", help="speedup-vs-γ plot written here")
    sd.add_argument("--quick", action="store_true", help="two γ, one batch of 2, 8 tokens: checks the benchmark runs")
    sd.add_argument("--json", default=None, help="also write the full report here")
    sd.set_defaults(func=cmd_bench_specdec)

    from pdserve.bench.serve_command import add_parser as add_bench_serve_parser  # bench serve: its own module

    add_bench_serve_parser(bench)
    from pdserve.bench.step import add_parser as add_bench_step_parser  # bench step: its own module

    add_bench_step_parser(bench)
    from pdserve.plan.command import add_parser as add_plan_parser  # pdserve plan: its own module

    add_plan_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "address_default", None) and args.address is None:
        args.address = args.address_default
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        code = args.func(args, extra) if getattr(args, "passthrough", False) else args.func(args)
    except (FileNotFoundError, IsADirectoryError, PermissionError, ValueError, ConnectionError) as e:
        print(f"pdserve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pdserve: interrupted", file=sys.stderr)
        return 130
    if argv is None and args.func is cmd_run_batch:  # this process's own command: nothing runs after it
        exit_now(code)
    return code


def exit_now(code: int) -> None:
    """End a finished run-batch without the slow teardown (Ray's graceful shutdown, the interpreter's):
    the output and journal are written, flushed, fsynced and closed and the workers stopped by now."""
    sys.stdout.flush()
    sys.stderr.flush()
    if "ray" in sys.modules:
        from pdserve.runtime.cluster import stop_local_cluster

        stop_local_cluster()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
