"""`--mode auto` for offline batches (run-batch, bench throughput): which mode runs one CPU node faster.

On one CPU node PD splits the node's cores between a prefill worker and a decode worker, ships every
prompt's KV through shared memory and keeps two copies of the model; a colocated worker does the same
work in one process, its prefill chunks mixed into decode steps. Measured on the project's 2-core
Zen 4 machine on a quiet machine (issue 22; docs/benchmarks.md, "Against vLLM on the same CPU"), PD with
the node core lease (engine/core_lease.py) finished the benchmark's 64 requests sooner than colocated
(345-360 against 299-323 output tok/s, alternated), so auto picks pd there too; the choice stays one
constant, re-measured when either path changes. Anywhere else (a cluster joined with --address, a GPU,
PD-only features asked for) auto is pd. An explicit --mode always wins.
"""

from __future__ import annotations

import argparse
import logging

from proto.kinds import Mode

log = logging.getLogger("pdserve.cli")

SINGLE_CPU_NODE = Mode.PD  # the measured winner (module docstring)


def pd_only_asks(args: argparse.Namespace) -> list[str]:
    """The flags given that only PD serves: with any of them, auto is pd."""
    asks = []
    if getattr(args, "speculative", "off") not in (None, "", "off"):
        asks.append("--speculative")
    if getattr(args, "deployment", None):
        asks.append("--deployment")
    if getattr(args, "prefill_tp", 0) or getattr(args, "decode_tp", 0):
        asks.append("--prefill-tp/--decode-tp")
    if args.prefill_workers != 1 or args.decode_workers != 1:
        asks.append("--prefill-workers/--decode-workers")
    for role in ("prefill", "decode"):
        if getattr(args, f"{role}_threads", 0) or getattr(args, f"{role}_cpus", 0) or \
                getattr(args, f"{role}_gpus", 0) or getattr(args, f"{role}_resources", "") or \
                getattr(args, f"{role}_labels", ""):
            asks.append(f"--{role}-* resources")
    return asks


def choose_offline_mode(args: argparse.Namespace, device: str) -> Mode:
    """The mode for `--mode auto` (`device`: the engine's, resolved), said in the log (at warning level:
    the default log shows it)."""
    asks = pd_only_asks(args)
    if args.address is None and device == "cpu" and not asks:
        other = Mode.COLOCATED if SINGLE_CPU_NODE is Mode.PD else Mode.PD
        log.warning("--mode auto: one CPU node (a local cluster, device cpu): running --mode %s, measured faster "
                    "offline on one CPU node than %s; give --mode %s to change it", SINGLE_CPU_NODE.value,
                    other.value, other.value)
        return SINGLE_CPU_NODE
    why = ", ".join(asks) or ("--address given" if args.address is not None else f"device {device}")
    log.info("--mode auto: running --mode pd (%s)", why)
    return Mode.PD
