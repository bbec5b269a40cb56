"""`pdserve bench NAME`: one module per benchmark, each with `add_parser(bench)` that adds `NAME` to the
`bench` subparsers and sets its command. To add a benchmark, write its module here and list it in
COMMANDS (tests/pdserve/cli checks that every module here is listed)."""

from __future__ import annotations

from pdserve.cli.bench import autoscale, kvtransfer, quant, serve, specdec, step, structured, throughput

COMMANDS = (  # in `pdserve bench --help` order
    throughput,
    kvtransfer,
    quant,
    specdec,
    serve,
    autoscale,
    structured,
    step,
)


def add_parser(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    for command in COMMANDS:
        command.add_parser(bench)
