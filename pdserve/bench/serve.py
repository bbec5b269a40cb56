"""`pdserve bench serve`: SLO attainment and goodput against the request rate (DistServe's figure).

For each mode (`ClusterConfig.mode`: pd, colocated) the workers start once;
then, for each rate, requests of the bench workload arrive at seeded Poisson
or gamma times and each is streamed through the official `openai` client
against the in-process server (`start_server`), or, with `direct`, handed
straight to the serving loop (the router on its thread, no HTTP). Times are
the client's: TTFT from sending to the first content, TPOT from the first
content to the end of the stream over the output tokens after the first,
e2e from sending to the end. A request meets its SLO when it succeeded with
TTFT and TPOT within theirs; a failed one is a miss. Every request of one
mode sees the same workload and arrival times as the other mode's.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from engine.config import EngineConfig
from pdserve.bench.arrivals import ArrivalSpec, arrival_times
from pdserve.bench.sustained import sustained_rate
from pdserve.bench.workload import BenchRequest, WorkloadSpec, make_workload
from pdserve.observability.metrics import SLO, percentile
from pdserve.runtime.cluster import ClusterConfig, start_workers, stop_workers
from proto.stats import StepWorkerStats
from proto.workers import WorkerSet
from router.router import RouterConfig


@dataclass(frozen=True)
class ServeBench:
    rates: tuple[float, ...] = (0.5, 1.0, 2.0)
    modes: tuple[str, ...] = ("pd", "colocated")
    arrival: ArrivalSpec = field(default_factory=ArrivalSpec)
    num_prompts: int = 50  # per rate
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    slo: SLO = field(default_factory=SLO)
    direct: bool = False  # the serving loop in-process instead of HTTP + the openai client
    target: float = 0.9  # attainment the sustained rate is read at
    warmup: int = 2  # requests per mode before the first rate, not counted
    request_timeout_s: float = 600.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.rates or min(self.rates) <= 0 or len(set(self.rates)) != len(self.rates):
            raise ValueError(f"--request-rates takes distinct positive rates, got {self.rates}")
        if not self.modes:
            raise ValueError("--modes names at least one mode")
        if self.num_prompts < 1:
            raise ValueError("--num-prompts must be at least 1")


@dataclass
class Sample:
    """One request as the client saw it; times in seconds from the start of its rate's run."""

    custom_id: str
    prompt_tokens: int
    max_tokens: int
    scheduled: float  # when it was due to arrive
    sent: float = 0.0
    first: float | None = None  # first content
    end: float | None = None  # end of the stream
    output_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the server found in its prefix cache
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first is None else self.first - self.sent

    @property
    def tpot(self) -> float | None:
        if self.error or self.first is None or self.end is None or self.output_tokens < 2:
            return None
        return (self.end - self.first) / (self.output_tokens - 1)

    @property
    def e2e(self) -> float | None:
        return None if self.end is None else self.end - self.sent

    def meets(self, slo: SLO) -> tuple[bool, bool]:
        """(TTFT ok, TPOT ok), both False for a failed request; no TPOT (one token) meets it."""
        if self.error is not None:
            return False, False
        ttft, tpot = self.ttft, self.tpot
        return ttft is not None and ttft <= slo.ttft_s, tpot is None or tpot <= slo.tpot_s


Send = Callable[[BenchRequest, Sample, float], Awaitable[None]]


# ---- the two front ends ------------------------------------------------------------------------
def _openai_sender(url: str, model: str, timeout_s: float) -> tuple[Send, Callable[[], Awaitable[None]]]:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=timeout_s)

    async def send(req: BenchRequest, s: Sample, t0: float) -> None:
        try:
            stream = await client.chat.completions.create(
                model=model, messages=list(req.messages), max_tokens=req.max_tokens, temperature=0, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content and s.first is None:
                    s.first = time.perf_counter() - t0
                if chunk.usage is not None:
                    s.output_tokens = chunk.usage.completion_tokens
                    details = chunk.usage.prompt_tokens_details
                    s.cached_tokens = (details.cached_tokens or 0) if details is not None else 0
            s.end = time.perf_counter() - t0
        except openai.OpenAIError as e:
            s.error = f"{type(e).__name__}: {e}"

    return send, client.close


def _direct_sender(loop, tokenizer, limits, timeout_s: float) -> Send:
    """Requests built as the server builds them, straight into its serving loop (no HTTP); one not
    finished within `timeout_s` is aborted (its blocks freed), as the server's deadline does."""
    from pdserve.openai.requests import InvalidRequest, build_request
    from pdserve.serve.errors import ApiError
    from pdserve.serve.events import Expired, Finished, Tokens
    from pdserve.serve.loop import InFlight

    numbers = iter(range(1, 1 << 62))

    async def send(req: BenchRequest, s: Sample, t0: float) -> None:
        body = {"messages": list(req.messages), "max_tokens": req.max_tokens, "temperature": 0, "ignore_eos": True}
        try:
            r = await asyncio.to_thread(build_request, next(numbers), req.custom_id, "chat", body, tokenizer, limits)
            loop.admission.admit(r)
        except (InvalidRequest, ApiError) as e:
            s.error = f"refused: {e}"
            return
        flight = InFlight(loop, r, timeout_s)
        while isinstance(event := await flight.next(), Tokens):
            if s.first is None:
                s.first = time.perf_counter() - t0
        if isinstance(event, Expired):
            s.error = f"not finished within {timeout_s:g}s"
            return
        s.end = time.perf_counter() - t0
        if isinstance(event, Finished) and event.ok:
            s.output_tokens = len(event.request.output_token_ids)
            s.cached_tokens = event.request.cached_tokens
        else:  # failed, or the router thread died
            s.error = str(event.request.error if isinstance(event, Finished) else event.error)

    return send


@contextlib.contextmanager
def _front_end(bench: ServeBench, engine: EngineConfig, cluster: ClusterConfig, router_config: RouterConfig,
               workers: WorkerSet) -> Iterator[tuple[Any, Callable[[], tuple[Send, Callable | None]]]]:
    """(the serving loop, a factory of senders bound to the running event loop)."""
    from pdserve.openai.limits import model_limits
    from pdserve.serve.server import ServeOptions, start_server

    if bench.direct:
        from pdserve.observability.dashboard.collector import MetricsCollector
        from pdserve.runtime.backend import Backend
        from pdserve.serve.admission import Admission, AdmissionConfig
        from pdserve.serve.loop import ServingLoop

        tokenizer, _, limits = model_limits(engine, 512, ignore_eos=True)
        collector = MetricsCollector(bench.slo)
        backend = Backend.open(engine, cluster, router_config, workers=workers)
        loop = ServingLoop(lambda on_finished, on_tokens: backend.make_router(on_finished, on_tokens=on_tokens),
                           Admission(AdmissionConfig(), bench.slo), collector)
        try:
            yield loop, lambda: (_direct_sender(loop, tokenizer, limits, bench.request_timeout_s), None)
        finally:
            loop.stop()
        return
    options = ServeOptions(port=0, slo=bench.slo, request_timeout_s=bench.request_timeout_s)
    running = start_server(engine, cluster, router_config, options, workers=workers)
    _, name, _ = model_limits(engine, 512, ignore_eos=True)
    try:
        yield running.loop, lambda: _openai_sender(running.url, name, bench.request_timeout_s)
    finally:
        running.stop()


# ---- one rate ----------------------------------------------------------------------------------
async def _run_rate(send: Send, requests: list[BenchRequest], offsets: list[float]) -> list[Sample]:
    samples = [Sample(r.custom_id, len(r.prompt_ids), r.max_tokens, at) for r, at in zip(requests, offsets)]
    t0 = time.perf_counter()

    async def one(req: BenchRequest, s: Sample) -> None:
        delay = t0 + s.scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        s.sent = time.perf_counter() - t0
        await send(req, s, t0)

    await asyncio.gather(*(one(r, s) for r, s in zip(requests, samples)))
    return samples


def summarize(samples: list[Sample], rate: float, slo: SLO) -> dict[str, Any]:
    """One rate's row: attainment, goodput, offered vs achieved rate, latency percentiles."""
    n = len(samples)
    ok = [s for s in samples if s.error is None]
    meets = [s.meets(slo) for s in samples]
    within = sum(t and p for t, p in meets)
    span = max((s.end or s.sent) for s in samples) - min(s.sent for s in samples)
    sent = sorted(s.sent for s in samples)  # what the client really offered (it may lag the schedule)
    offered = (n - 1) / (sent[-1] - sent[0]) if n > 1 and sent[-1] > sent[0] else None

    def pct(values: list[float | None]) -> dict[str, float | None]:
        vs = [v for v in values if v is not None]
        return {f"p{q}": percentile(vs, q) for q in (50, 90, 99)}

    return {"rate_rps": rate, "requests": n, "completed": len(ok), "failed": n - len(ok),
            "offered_rps": offered, "achieved_rps": len(ok) / span if span > 0 else None,
            "goodput_rps": within / span if span > 0 else None, "within_slo": within,
            "attainment": within / n, "ttft_attainment": sum(t for t, _ in meets) / n,
            "tpot_attainment": sum(p for _, p in meets) / n, "wall_s": span,
            "output_tokens": sum(s.output_tokens for s in ok),
            "cached_prompt_tokens": sum(s.cached_tokens for s in ok),
            "prompt_tokens": sum(s.prompt_tokens for s in ok),
            "ttft_s": pct([s.ttft for s in ok]), "tpot_s": pct([s.tpot for s in ok]), "e2e_s": pct([s.e2e for s in ok]),
            "errors": sorted({s.error for s in samples if s.error})[:5]}


# ---- one mode ----------------------------------------------------------------------------------
async def _wait_idle(loop, workers: WorkerSet, timeout_s: float = 60.0) -> int:
    """KV blocks still held once the router has nothing in flight (0 unless blocks leaked). Blocks held by
    requests still in flight are not leaked: past the timeout with some left, the check fails loudly."""
    from pdserve.runtime.backend import leaked_blocks

    deadline = time.monotonic() + timeout_s
    while True:
        held = await asyncio.to_thread(leaked_blocks, workers)
        if not loop.router.active and (held == 0 or time.monotonic() > deadline):
            return held
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(loop.router.active)} requests still in flight {timeout_s:g}s after the "
                               "rate's last one ended: cannot tell held KV blocks from leaked ones")
        await asyncio.sleep(0.2)


def _counters(s: StepWorkerStats) -> tuple[float, ...]:
    """steps, step seconds, rows, step CPU seconds, context tokens, run-queue seconds: what decode_stage
    compares. A counter a worker does not keep (colocated: contexts; a kernel without per-thread
    scheduler stats: run-queue time) counts as 0."""
    loop = s.loop
    return (loop.steps, loop.step_seconds, loop.step_rows, loop.step_cpu_seconds,
            getattr(s, "step_context_tokens", 0), loop.step_run_queue_seconds or 0.0)


def _decode_counters(workers: WorkerSet) -> tuple[float, ...] | None:
    """The decode workers' counters (`_counters`), each summed over them; None when one cannot answer
    (restarting)."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError

    try:
        stats = ray.get([h.stats.remote() for h in workers.decode.values()], timeout=60)
    except (RayActorError, GetTimeoutError):
        return None
    return tuple(sum(column) for column in zip(*(_counters(s) for s in stats)))


def decode_stage(before: tuple[float, ...] | None, after: tuple[float, ...] | None,
                 wall_s: float, workers: int) -> dict[str, Any]:
    """What the decode workers did during one rate: steps, mean step time (wall, and the stepping
    thread's CPU time: at one torch thread the gap is time spent waiting for a core or the GIL; of it,
    core_wait_ms waited in the kernel's run queue) and rows per step (pd: the decode batch; colocated:
    decode rows plus prompt chunks) at a mean context (pd), and the share of the rate's wall time they
    spent stepping (busy): the figures the planner's decode model predicts. All None when a worker
    restarted during the rate (its counters began again)."""
    keys = ("steps", "rows", "step_ms", "step_cpu_ms", "mean_batch", "mean_context", "core_wait_ms", "busy")
    if before is None or after is None or any(a < b for a, b in zip(after, before)):
        return dict.fromkeys(keys)
    steps, seconds, rows, cpu, context, queued = (a - b for a, b in zip(after, before))
    per_step = (lambda x: x / steps) if steps else (lambda x: None)
    return {"steps": steps, "rows": rows, "step_ms": per_step(1e3 * seconds), "step_cpu_ms": per_step(1e3 * cpu),
            "mean_batch": per_step(rows), "mean_context": context / rows if rows and context else None,
            "core_wait_ms": per_step(1e3 * queued) if queued else None,
            "busy": seconds / (wall_s * workers) if wall_s > 0 and workers else None}


def _run_mode(bench: ServeBench, engine: EngineConfig, cluster: ClusterConfig, router_config: RouterConfig,
              workers: WorkerSet, runs: list[tuple[float, list[BenchRequest], list[float]]],
              warmup: list[BenchRequest], print_fn: Callable[[str], None]) -> dict[str, Any]:
    """Every rate on these workers (stopped at the end)."""
    mode = cluster.mode
    try:
        with _front_end(bench, engine, cluster, router_config, workers) as (loop, senders):
            async def all_rates() -> dict[str, Any]:
                send, close = senders()
                try:
                    if warmup:
                        await _run_rate(send, warmup, [0.0] * len(warmup))
                        await _wait_idle(loop, workers)
                    rows, leaked = [], 0
                    for rate, requests, offsets in runs:
                        before = await asyncio.to_thread(_decode_counters, workers)
                        cpu_before = time.process_time()  # this process: router, front end, client
                        samples = await _run_rate(send, requests, offsets)
                        leaked = max(leaked, await _wait_idle(loop, workers))
                        row = summarize(samples, rate, bench.slo)
                        row["front_end_cpu_s"] = time.process_time() - cpu_before
                        row["decode"] = decode_stage(before, await asyncio.to_thread(_decode_counters, workers),
                                                     row["wall_s"], len(workers.decode))
                        rows.append(row)
                        d = row["decode"]
                        print_fn(f"[{mode}] {rate:g} req/s: attainment {row['attainment']:.0%}, goodput "
                                 f"{_fmt(row['goodput_rps'])} req/s, {row['failed']} failed; step "
                                 f"{_fmt(d['step_ms'], '.1f')} ms (CPU {_fmt(d['step_cpu_ms'], '.1f')}) "
                                 f"at {_fmt(d['mean_batch'], '.1f')} "
                                 f"{'rows (decode + chunks)' if mode == 'colocated' else 'sequences'}"
                                 + (f" at context {d['mean_context']:.0f}" if d["mean_context"] else "")
                                 + (f", {d['core_wait_ms']:.1f} ms waiting for a core" if d["core_wait_ms"] else "")
                                 + f", busy {_fmt(d['busy'], '.0%')}")
                    return {"rates": rows, "kv_blocks_leaked": leaked}
                finally:
                    if close is not None:
                        await close()

            result = asyncio.run(all_rates())
    finally:
        stop_workers(workers)
    points = [(r["rate_rps"], r["attainment"]) for r in result["rates"]]
    result["sustained"] = asdict(sustained_rate(points, bench.target))
    return result


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def make_runs(bench: ServeBench, tokenizer: Any) -> tuple[list[tuple[float, list[BenchRequest], list[float]]],
                                                          list[BenchRequest]]:
    """Per rate: its own requests (seeded by the rate's index, so no rate replays another's prompts into
    the prefix cache) and arrival offsets; plus the warm-up requests."""
    runs = []
    for i, rate in enumerate(bench.rates):
        spec = replace(bench.workload, num_requests=bench.num_prompts, seed=bench.seed + 1000 * (i + 1))
        requests = [replace(r, custom_id=f"{rate:g}-{r.custom_id}") for r in make_workload(spec, tokenizer)]
        runs.append((rate, requests, arrival_times(bench.arrival, rate, len(requests), bench.seed + i).tolist()))
    warm_spec = replace(bench.workload, num_requests=bench.warmup, seed=bench.seed + 999_999)
    warmup = [replace(r, custom_id=f"warmup-{r.custom_id}") for r in make_workload(warm_spec, tokenizer)]
    return runs, warmup


def run(bench: ServeBench, engine: EngineConfig, cluster: ClusterConfig, router_config: RouterConfig,
        print_fn: Callable[[str], None] = print) -> dict[str, Any]:
    """Every mode at every rate; the report's dict (see pdserve.bench.serve_report for its rendering)."""
    from pdserve.openai.limits import model_limits

    tokenizer, name, _ = model_limits(engine, 512, ignore_eos=True)
    runs, warmup = make_runs(bench, tokenizer)
    report: dict[str, Any] = {
        "model": name, "arrival": asdict(bench.arrival), "arrival_text": bench.arrival.describe(),
        "rates": list(bench.rates), "num_prompts": bench.num_prompts, "workload": asdict(bench.workload),
        "slo": asdict(bench.slo), "target": bench.target, "front_end": "direct" if bench.direct else "openai",
        "workers": {"prefill": cluster.num_prefill, "decode": cluster.num_decode, "max_num_seqs": engine.max_num_seqs},
        "lengths": [[len(r.prompt_ids), r.max_tokens] for _, reqs, _ in runs for r in reqs], "modes": {}}
    for mode in bench.modes:
        print_fn(f"[{mode}] starting workers ...")
        try:
            config = replace(cluster, mode=mode)
            workers = start_workers(engine, config)
        except (ValueError, RuntimeError) as e:  # a mode that cannot start here: say so, run the others
            print_fn(f"[{mode}] could not start: {e}")
            report["modes"][mode] = {"error": str(e)}
            continue
        report["modes"][mode] = _run_mode(bench, engine, config, router_config, workers, runs, warmup, print_fn)
    return report
