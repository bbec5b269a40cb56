"""`pdserve run-batch`: an OpenAI-format JSONL batch through workers it starts (or a deployment's)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pdserve.cli import flags


def add_parser(sub) -> None:
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
    flags.slo_args(rb)
    flags.engine_args(rb)
    flags.cluster_args(rb, offline=True)
    rb.set_defaults(func=cmd_run_batch)


def cmd_run_batch(args: argparse.Namespace) -> int:
    import signal

    from pdserve.runtime.cluster import check_address
    from pdserve.runtime.startup import process_age_s

    logging.getLogger("pdserve.cli").info("start-up: python and imports %.1f s", process_age_s())
    check_address(args.address)  # in seconds, before the model and tokenizer load
    from pdserve.batch.run import BatchOptions, run_batch

    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops as cleanly as Ctrl-C
    engine = flags.engine_config(args)
    slo = flags.slo_config(args)
    collector, server = _dashboard(args, slo) if args.dashboard else (None, None)
    try:
        summary = run_batch(Path(args.input), Path(args.output), engine, flags.cluster_config(args),
                            flags.router_config(args, engine),
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


def _dashboard(args: argparse.Namespace, slo):
    """(the batch's metrics collector, the live dashboard serving it), started before the batch."""
    from pdserve.observability.dashboard.collector import MetricsCollector
    from pdserve.observability.dashboard.server import DashboardServer

    collector = MetricsCollector(slo, title=f"pdserve: {Path(args.input).name}")
    server = DashboardServer(collector, host=args.dashboard_host, port=args.dashboard_port)
    print(f"dashboard: {server.url}  (Prometheus: {server.url}metrics)", file=sys.stderr)
    return collector, server
