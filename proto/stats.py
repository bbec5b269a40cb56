"""What workers report about themselves: typed answers to `stats()`, `where()` and `startup()`."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class LoopStats:
    """A step loop's counters (decode_worker/step_loop.py), summed since the worker started.

    `step_cpu_seconds` is the loop thread's CPU time inside steps: at one torch thread, less than
    `step_seconds` by the time it waited for a core or the GIL (with more threads, OpenMP's work too).
    `step_run_queue_seconds` is the part of that wait spent runnable without a core (None where the
    OS does not say). `phase_seconds` / `phase_cpu_seconds`: wall / CPU seconds per named phase of the
    loop (decode_worker/phases.py)."""

    steps: int = 0
    step_seconds: float = 0.0
    step_rows: int = 0  # sum of batch sizes over steps
    step_cpu_seconds: float = 0.0
    poll_cpu_seconds: float = 0.0  # CPU time of poll() calls on the actor's threads (streamed progress)
    step_run_queue_seconds: float | None = None
    phase_seconds: dict[str, float] = field(default_factory=dict)
    phase_cpu_seconds: dict[str, float] = field(default_factory=dict)
    # Steps and their wall seconds per batch size (rows): the step-time curve a run measured.
    steps_by_rows: dict[int, tuple[int, float]] = field(default_factory=dict)
    lease_wait_seconds: float = 0.0  # waiting for the node's cores while a prefill worker held them


@dataclass(frozen=True)
class PrefillStats:
    """A prefill worker's counters since it started (prefill_worker/worker.py)."""

    worker_id: str
    batches: int = 0
    prompt_tokens: int = 0
    computed_tokens: int = 0  # prompt tokens less those its prefix cache served
    forward_seconds: float = 0.0  # wall seconds inside the model's forward (KV sent layer by layer inside it)
    call_seconds: float = 0.0  # wall seconds of whole prefill calls (cache, forward, sampling, transfers' ends)
    lease_wait_seconds: float = 0.0  # waiting for the node's cores while a decode step held them


@dataclass(frozen=True)
class PoolStats:
    """A worker's paged KV pool as its BlockManager sees it."""

    num_blocks: int
    free_blocks: int
    reserved_requests: int  # requests holding blocks
    cached_blocks: int  # free blocks that still hold a keyed prefix (prefix caching)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - self.free_blocks


@dataclass(frozen=True)
class DecodeStats:
    """A PD decode worker: its pool, its batch and its loop."""

    worker_id: str
    pool: PoolStats
    running: int
    waiting: int
    loop: LoopStats
    # Sum over steps of each row's position: / loop.step_rows = the mean context a step ran at.
    step_context_tokens: int = 0


@dataclass(frozen=True)
class ColocatedStats:
    """A colocated worker: as a decode worker, plus the tokens its mixed steps computed per kind."""

    worker_id: str
    pool: PoolStats
    running: int
    waiting: int
    loop: LoopStats
    prefill_tokens: int = 0
    decode_tokens: int = 0
    max_num_batched_tokens: int = 0


StepWorkerStats = DecodeStats | ColocatedStats


@dataclass(frozen=True)
class WorkerPlacement:
    """Where a worker landed and what it runs on (`where()`): the router checks that dtypes agree and
    picks transports from node ids; `pdserve status` prints it."""

    worker_id: str
    node_id: str
    node_ip: str
    device: str  # cpu | cuda
    dtype: str  # resolved: float32 | bfloat16 | float16
    threads: int
    pid: int
    gpu: str | None = None  # the CUDA device's name
    cpu: str | None = None  # the CPU's model and ISA, as the worker describes it
