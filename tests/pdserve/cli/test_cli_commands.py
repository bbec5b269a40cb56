"""The command line as a package: each command in its own module, registered once, the same commands as
before (users' scripts call them)."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

from pdserve.cli import bench, build_parser, commands

CLI = Path(commands.__file__).parent
NOT_COMMANDS = {"__init__", "__main__", "commands", "flags"}


def _subcommands(parser) -> list[str]:
    return list(next(a for a in parser._actions if a.dest in ("command", "bench")).choices)


def test_every_command_module_is_registered():
    modules = {p.stem for p in CLI.glob("*.py")} - NOT_COMMANDS | {"bench"}
    assert {m.__name__.rsplit(".", 1)[1] for m in commands.COMMANDS} == modules
    bench_modules = {p.stem for p in (CLI / "bench").glob("*.py")} - {"__init__"}
    assert {m.__name__.rsplit(".", 1)[1] for m in bench.COMMANDS} == bench_modules


def test_the_commands_users_know():
    parser = build_parser()
    assert _subcommands(parser) == ["run-batch", "serve", "up", "status", "down", "dashboard", "submit", "report",
                                    "bench", "plan"]
    bench_parser = parser._subparsers._group_actions[0].choices["bench"]
    assert _subcommands(bench_parser) == ["throughput", "kvtransfer", "quant", "specdec", "serve", "autoscale",
                                          "structured", "step"]


def test_a_bench_subcommand_is_one_registration(monkeypatch):
    def add_parser(sub) -> None:
        sub.add_parser("probe", help="a new benchmark").set_defaults(func=lambda args: 7)

    probe = types.SimpleNamespace(add_parser=add_parser)
    monkeypatch.setattr(bench, "COMMANDS", (*bench.COMMANDS, probe))
    args = build_parser().parse_args(["bench", "probe"])
    assert args.func(args) == 7


def test_python_dash_m_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "pdserve.cli", "bench", "--help"], capture_output=True, text=True,
                         check=True)
    assert "{throughput,kvtransfer,quant,specdec,serve,autoscale,structured,step}" in out.stdout
