"""The `pdserve` command line: one module per command (run_batch, serve, deployment: up/status/down/dashboard,
submit, report, plan, bench/: one per benchmark), each with `add_parser(subparsers)`; the flags several
commands share and the configs built from them in flags.py; the parser and `main` in commands.py."""

from __future__ import annotations

from pdserve.cli.commands import build_parser, main
from pdserve.cli.flags import cluster_config, engine_config, router_config

__all__ = ["build_parser", "cluster_config", "engine_config", "main", "router_config"]
