"""The `pdserve` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from engine.config import DTYPES, EngineConfig, default_device
from kvtransfer.base import TRANSPORTS


def _engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and engine")
    g.add_argument("--model", default=None,
                   help="an HF folder, a .gguf file, or omit for the default SmolLM2-135M-Instruct")
    g.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    g.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present, else cpu)")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    g.add_argument("--kv-cache-gib", type=float, default=2.0, help="KV pool size per decode worker")
    g.add_argument("--max-num-seqs", type=int, default=128, help="decode batch limit")
    g.add_argument("--max-prefill-tokens", type=int, default=2048, help="prefill batch token budget")
    g.add_argument("--cache-dir", default=None, help="where converted weights are cached")


def _cluster_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster")
    g.add_argument("--address", default=None,
                   help="Ray cluster: omit to start a local one, 'auto' to join the running one, or ray://host:port")
    g.add_argument("--prefill-workers", type=int, default=1)
    g.add_argument("--decode-workers", type=int, default=1)
    g.add_argument("--transport", default="auto", choices=TRANSPORTS,
                   help="KV transport; auto: shared memory on the same node, gRPC across nodes")
    g.add_argument("--prefill-threads", type=int, default=0, help="torch threads per prefill worker (0: auto)")
    g.add_argument("--decode-threads", type=int, default=0, help="torch threads per decode worker (0: auto)")
    g.add_argument("--transfer-timeout", type=float, default=60.0, help="deadline of one request's KV transfer (s)")
    g.add_argument("--tls-cert", default=None, help="PEM certificate of the KV endpoints (enables TLS)")
    g.add_argument("--tls-key", default=None, help="PEM private key for --tls-cert")
    g.add_argument("--tls-ca", default=None, help="PEM CA that signed --tls-cert (default: the cert itself)")


def engine_config(args: argparse.Namespace) -> EngineConfig:
    kwargs = dict(model=args.model, dtype=args.dtype, device=args.device or default_device(),
                  block_size=args.block_size, kv_cache_gib=args.kv_cache_gib, max_num_seqs=args.max_num_seqs,
                  max_prefill_tokens=args.max_prefill_tokens)
    if args.cache_dir:
        kwargs["cache_dir"] = args.cache_dir
    return EngineConfig(**kwargs)


def cluster_config(args: argparse.Namespace):
    from proto.messages import TLSFiles
    from router.cluster import ClusterConfig

    tls = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        tls = TLSFiles(args.tls_cert, args.tls_key, args.tls_ca or args.tls_cert)
    return ClusterConfig(address=args.address, num_prefill=args.prefill_workers, num_decode=args.decode_workers,
                         transport=args.transport, prefill_threads=args.prefill_threads,
                         decode_threads=args.decode_threads, transfer_timeout_s=args.transfer_timeout, tls=tls)


def cmd_run_batch(args: argparse.Namespace) -> int:
    from router.offline import BatchOptions, run_batch
    from router.router import RouterConfig

    import signal

    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops as cleanly as Ctrl-C
    engine = engine_config(args)
    try:
        summary = run_batch(Path(args.input), Path(args.output), engine, cluster_config(args),
                            RouterConfig(max_prefill_tokens=engine.max_prefill_tokens),
                            BatchOptions(default_max_tokens=args.default_max_tokens, ignore_eos=args.ignore_eos,
                                         progress=not args.quiet, resume=not args.no_resume))
    except KeyboardInterrupt:
        print(f"pdserve: interrupted; finished lines are in {args.output}. Run the same command again to "
              "finish the rest.", file=sys.stderr)
        return 130
    print(summary.render())
    return 0


def cmd_bench_throughput(args: argparse.Namespace) -> int:
    import json

    from pdserve.bench.throughput import SYSTEMS, ThroughputBench, run
    from pdserve.bench.workload import WorkloadSpec

    if args.quick:
        spec = WorkloadSpec(num_requests=4, min_prompt=16, max_prompt=64, min_output=2, max_output=6, seed=args.seed)
    else:
        spec = WorkloadSpec(num_requests=args.num_requests, seed=args.seed)
    systems = tuple(s for s in args.systems.split(",") if s)
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        raise ValueError(f"--systems takes {','.join(SYSTEMS)}; unknown: {','.join(sorted(unknown))}")
    bench = ThroughputBench(workload=spec, dtypes=tuple(args.dtypes.split(",")), systems=systems,
                            static_batch_size=args.static_batch_size)
    report = run(bench, engine_config(args), cluster_config(args))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print(report["last_line"])
    return 0


def cmd_bench_kvtransfer(args: argparse.Namespace) -> int:
    from pdserve.bench.kvtransfer import KVBench, last_line, run

    tokens = (64, 512) if args.quick else tuple(int(t) for t in args.tokens.split(","))
    transports = tuple(t for t in args.transports.split(",") if t)
    report = run(KVBench(tokens=tokens, transports=transports, dtype=args.dtype, repeats=1 if args.quick else 3))
    print(last_line(report, transports))
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
    _engine_args(rb)
    _cluster_args(rb)
    rb.set_defaults(func=cmd_run_batch)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    tp = bench.add_parser("throughput", help="pdserve vs transformers (static and continuous batching)")
    tp.add_argument("--quick", action="store_true", help="4 short requests: checks the benchmark runs")
    tp.add_argument("--num-requests", type=int, default=64)
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
    kv.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    kv.add_argument("--quick", action="store_true", help="two small caches, one repeat")
    kv.set_defaults(func=cmd_bench_kvtransfer)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return args.func(args)
    except (FileNotFoundError, IsADirectoryError, PermissionError, ValueError) as e:
        print(f"pdserve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pdserve: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
