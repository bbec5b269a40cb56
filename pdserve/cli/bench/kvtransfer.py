"""`pdserve bench kvtransfer`: KV caches through each transport against an in-memory copy."""

from __future__ import annotations

import argparse

from engine.config import DTYPE_NAMES


def add_parser(bench) -> None:
    kv = bench.add_parser("kvtransfer", help="KV caches through each transport vs an in-memory copy")
    kv.add_argument("--tokens", default="1024,8192,32768", help="comma-separated cache sizes in tokens")
    kv.add_argument("--transports", default="shm,grpc")
    kv.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPE_NAMES))
    kv.add_argument("--quick", action="store_true", help="two small caches, one repeat")
    kv.add_argument("--chunk-kib", type=int, default=0, help="gRPC chunk size to try (0: the default)")
    kv.set_defaults(func=cmd_bench_kvtransfer)


def cmd_bench_kvtransfer(args: argparse.Namespace) -> int:
    from engine.cpu_features import CpuInfo
    from pdserve.bench.kvtransfer import KVBench, last_line, run

    tokens = (64, 512) if args.quick else tuple(int(t) for t in args.tokens.split(","))
    transports = tuple(t for t in args.transports.split(",") if t)
    print(CpuInfo.here().describe())
    report = run(KVBench(tokens=tokens, transports=transports, dtype=args.dtype, repeats=1 if args.quick else 3,
                         chunk_kib=args.chunk_kib))
    print(last_line(report, transports))
    return 0
