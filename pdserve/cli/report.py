"""`pdserve report`: the dashboard's panels for a finished batch, as one HTML file."""

from __future__ import annotations

import argparse
from pathlib import Path

from pdserve.cli import flags


def add_parser(sub) -> None:
    rp = sub.add_parser("report", help="write the dashboard's panels for a finished batch as one HTML file")
    rp.add_argument("output_file", help="a run-batch output JSONL")
    rp.add_argument("-o", required=True, help="the HTML report to write")
    flags.slo_args(rp)
    rp.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from pdserve.observability.dashboard.report import write_report

    state = write_report(Path(args.output_file), Path(args.o), flags.slo_config(args))
    s = state["summary"]
    print(f"{s['requests']} requests, goodput {s['goodput_rps']:.3f} req/s, SLO attainment "
          f"{(s['slo_attainment'] or 0):.1%} -> {args.o}")
    return 0
