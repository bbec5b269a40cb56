"""The `pdserve` parser, assembled from the commands' own modules, and `main`."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from pdserve.cli import bench, deployment, plan, report, run_batch, serve, submit

COMMANDS = (run_batch, serve, deployment, submit, report, bench, plan)  # each adds its subcommands, in --help order


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description="Disaggregated prefill/decode LLM serving on Ray")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
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
    if argv is None and args.func is run_batch.cmd_run_batch:  # this process's own command: nothing runs after it
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
