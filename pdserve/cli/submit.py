"""`pdserve submit`: a batch as a Ray Job; the options it does not know go to run-batch on the cluster."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    sb = sub.add_parser("submit", help="run a batch as a Ray Job; other options go to run-batch on the cluster",
                        epilog="Example: pdserve submit -i in.jsonl -o out.jsonl --address http://head:8265 "
                               "--deployment pdserve")
    sb.add_argument("-i", "--input", required=True)
    sb.add_argument("-o", "--output", required=True)
    sb.add_argument("--address", required=True, help="the Ray dashboard / job server, http://HEAD:8265")
    sb.add_argument("--python", default="python", help="the cluster's Python that has pdserve installed")
    sb.set_defaults(func=cmd_submit, passthrough=True)


def cmd_submit(args: argparse.Namespace, passthrough: list[str]) -> int:
    from pdserve.runtime.jobs import submit

    return submit(Path(args.input), Path(args.output), args.address, passthrough, python=args.python)
