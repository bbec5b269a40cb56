"""Per-stage step times measured on this hardware, fitted to the models the planner uses.

    prefill call of prompts L_1..L_n, T = sum L_i:  t = max(floor, a + b*T + g*sum L_i^2)
    decode step of B sequences at context C:         t = c + d*B + e*B*C

A prefill call packs its prompts; each prompt attends only to itself, hence the per-prompt square. Below
some size a call costs about one read of every weight however few its tokens (~90 ms on one Zen 4 core
for SmolLM2-135M from 16 to 32 tokens): the floor, the quickest call profiled. The profile times single
prompts and calls packed from several prompts, up to the sizes the router packs.

Each point is the median over repeats (after a warm-up call): serving runs at the typical step time,
not the fastest one. A decode point times the serving step itself (ContinuousBatcher.step: forward,
greedy sampling, read-back, stop checks) over rows at mixed contexts whose mean is the point's, over a
KV pool of zeros: a step's time does not depend on the cached values, so the contexts need no prefill
first. Steps run eagerly: on CUDA the decode worker replays CUDA graphs, so a GPU profile overstates
its fixed step cost. Sampled requests (temperature > 0) cost more than the greedy steps profiled.

Workers that share a node slow each other down even on separate cores (memory bandwidth, the shared
cache, SMT siblings; on one GPU, its SMs). `measure(..., neighbour=True)` therefore times each stage a
second time while a busy neighbour -- another process running the other stage back to back on the
same device -- computes beside it (`prefill_busy`, `decode_busy`); the planner blends the two fits by
how busy the neighbours are (pdserve.plan.model).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pdserve.plan.decode_inputs import decode_step_inputs

PROFILE_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)  # 1: no busy-neighbour fits; 1-2: single-prompt (tokens, seconds) prefill points


@dataclass(frozen=True)
class PrefillFit:
    a_s: float  # fixed cost of one prefill call, seconds
    b_s_per_token: float
    g_s_per_token2: float = 0.0  # attention: per squared prompt length
    floor_s: float = 0.0  # no call is quicker

    def time(self, tokens: float, square_sum: float | None = None) -> float:
        """A call of `tokens` packed tokens whose prompts' squared lengths sum to `square_sum` (default:
        one prompt)."""
        squares = tokens * tokens if square_sum is None else square_sum
        return max(self.floor_s, self.a_s + self.b_s_per_token * tokens + self.g_s_per_token2 * squares)

    def toward(self, busy: PrefillFit | None, share: float) -> PrefillFit:
        """This fit moved `share` of the way to `busy` (the time-average over a neighbour busy that share of
        the time; a share above 1 extrapolates to more than one busy neighbour). A busy coefficient below
        the solo one is noise (a neighbour never speeds a stage up): it counts as the solo one."""
        if busy is None or share <= 0:
            return self
        return PrefillFit(_toward(self.a_s, busy.a_s, share), _toward(self.b_s_per_token, busy.b_s_per_token, share),
                          _toward(self.g_s_per_token2, busy.g_s_per_token2, share),
                          _toward(self.floor_s, busy.floor_s, share))


@dataclass(frozen=True)
class DecodeFit:
    c_s: float  # fixed cost of one step
    d_s_per_seq: float
    e_s_per_seq_token: float  # attention: per sequence per token of context

    def time(self, batch: float, context: float) -> float:
        return self.c_s + self.d_s_per_seq * batch + self.e_s_per_seq_token * batch * context

    def toward(self, busy: DecodeFit | None, share: float) -> DecodeFit:
        """As PrefillFit.toward."""
        if busy is None or share <= 0:
            return self
        return DecodeFit(_toward(self.c_s, busy.c_s, share), _toward(self.d_s_per_seq, busy.d_s_per_seq, share),
                         _toward(self.e_s_per_seq_token, busy.e_s_per_seq_token, share))


def _toward(solo: float, busy: float, share: float) -> float:
    return solo + share * max(busy - solo, 0.0)


@dataclass(frozen=True)
class StageProfile:
    """What the planner needs from the hardware; written and read as JSON (`--profile-out`, `--profile`)."""

    prefill: PrefillFit
    decode: DecodeFit
    kv_bytes_per_token: int  # all layers, K and V: what one prompt token costs the KV transfer
    num_layers: int
    threads: int  # torch threads the timings were taken with (the per-worker CPU share)
    description: str = ""  # model, dtype, device, CPU
    prefill_points: tuple[tuple[int, int, float], ...] = ()  # (prompts, tokens, seconds), equal prompts
    decode_points: tuple[tuple[int, int, float], ...] = ()  # (batch, context, seconds)
    # The same, timed while a neighbour process runs the other stage back to back on the same device.
    prefill_busy: PrefillFit | None = None
    decode_busy: DecodeFit | None = None
    prefill_busy_points: tuple[tuple[int, int, float], ...] = ()
    decode_busy_points: tuple[tuple[int, int, float], ...] = ()

    def to_json(self) -> str:
        return json.dumps({"version": PROFILE_VERSION, **asdict(self)}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> StageProfile:
        d = json.loads(text)
        version = d.pop("version", None) if isinstance(d, dict) else None
        if version not in READABLE_VERSIONS:
            raise ValueError(f"not a pdserve plan profile (version {' or '.join(map(str, READABLE_VERSIONS))})")
        try:
            pb, db = d.pop("prefill_busy", None), d.pop("decode_busy", None)
            points = {k: tuple(tuple(p) for p in d.pop(k, ())) for k in (
                "prefill_points", "decode_points", "prefill_busy_points", "decode_busy_points")}
            prefill, prefill_busy = PrefillFit(**d.pop("prefill")), PrefillFit(**pb) if pb else None
            if version < 3:  # single prompts as (tokens, seconds); the quickest of them is the floor
                for key in ("prefill_points", "prefill_busy_points"):
                    points[key] = tuple((1, t, sec) for t, sec in points[key])
                prefill = _with_floor(prefill, points["prefill_points"])
                prefill_busy = _with_floor(prefill_busy, points["prefill_busy_points"])
            return cls(prefill=prefill, decode=DecodeFit(**d.pop("decode")), prefill_busy=prefill_busy,
                       decode_busy=DecodeFit(**db) if db else None, **points, **d)
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed pdserve plan profile: {e}") from None

    def save(self, path: Path) -> None:
        path.write_text(self.to_json())

    @classmethod
    def load(cls, path: Path) -> StageProfile:
        return cls.from_json(path.read_text())


def fit_prefill(points: list[tuple[int, int, float]]) -> PrefillFit:
    """(prompts, tokens, seconds) of calls packed from equal prompts. The quickest call is the floor; the
    line is fitted to the calls clearly above it (when three or more are), which the floor would bend."""
    floor = min(sec for *_, sec in points)
    above = [p for p in points if p[2] > 1.1 * floor]
    above = above if len(above) >= 3 else points
    coef = _nonneg_lstsq([[1.0, t, t * t / n] for n, t, _ in above], [sec for *_, sec in above])
    return PrefillFit(*coef, floor_s=floor)


def _with_floor(fit: PrefillFit | None, points: tuple[tuple[int, int, float], ...]) -> PrefillFit | None:
    if fit is None or not points:
        return fit
    return PrefillFit(fit.a_s, fit.b_s_per_token, fit.g_s_per_token2, min(sec for *_, sec in points))


def fit_decode(points: list[tuple[int, int, float]]) -> DecodeFit:
    c, d, e = _nonneg_lstsq([[1.0, b, b * ctx] for b, ctx, _ in points], [s for _, _, s in points])
    return DecodeFit(c, d, e)


def _nonneg_lstsq(rows: list[list[float]], y: list[float]) -> list[float]:
    """Least squares; a coefficient that comes out negative (noise) is dropped to 0 and the rest refitted."""
    import numpy as np

    active = list(range(len(rows[0])))
    coef = [0.0] * len(rows[0])
    while active:
        x = np.array([[r[i] for i in active] for r in rows], dtype=float)
        sol = np.linalg.lstsq(x, np.array(y, dtype=float), rcond=None)[0]
        if (sol >= 0).all():
            for i, v in zip(active, sol):
                coef[i] = float(v)
            return coef
        active = [i for i, v in zip(active, sol) if v >= 0] if (sol >= 0).any() else []
    return coef


@dataclass(frozen=True)
class ProfileSizes:
    prefill_tokens: tuple[int, ...] = (32, 128, 512, 1024)  # single prompts
    prefill_packed: tuple[tuple[int, int], ...] = ((4, 64), (16, 64), (32, 64))  # (prompts, tokens each)
    # a step grows faster than the line from small batches predicts: profile the batches serving reaches
    decode_batches: tuple[int, ...] = (1, 8, 32, 64)  # 64 x 1024 tokens: a 1.5 GiB pool on the default model
    decode_contexts: tuple[int, ...] = (128, 1024)
    repeats: int = 3


QUICK_SIZES = ProfileSizes(prefill_tokens=(16, 64, 128), prefill_packed=((4, 32),), decode_batches=(1, 4),
                           decode_contexts=(32, 96), repeats=2)


def measure(runner, sizes: ProfileSizes, threads: int, description: str = "",
            neighbour: bool = False) -> StageProfile:
    """Time prefill and decode on `runner` (an engine.runner.ModelRunner) with `threads` torch threads;
    with `neighbour`, time both again beside a busy neighbour process (see the module docstring)."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    prefill_points, decode_points = _prefill_points(runner, sizes), _decode_points(runner, sizes)
    busy: dict[str, object] = {}
    if neighbour:
        from pdserve.plan.neighbour import Neighbour

        with Neighbour(runner.config, threads, sizes) as other:
            other.run("prefill")
            busy["decode_busy_points"] = tuple(_decode_points(runner, sizes))
            other.run("decode")
            busy["prefill_busy_points"] = tuple(_prefill_points(runner, sizes))
        busy["prefill_busy"] = fit_prefill(list(busy["prefill_busy_points"]))
        busy["decode_busy"] = fit_decode(list(busy["decode_busy_points"]))
    return StageProfile(prefill=fit_prefill(prefill_points), decode=fit_decode(decode_points),
                        kv_bytes_per_token=runner.kv_layout(num_blocks=1).bytes_per_token,  # int8 KV: + scales
                        num_layers=runner.arch.num_layers, threads=torch.get_num_threads(), description=description,
                        prefill_points=tuple(prefill_points), decode_points=tuple(decode_points), **busy)


def _prefill_points(runner, sizes: ProfileSizes) -> list[tuple[int, int, float]]:
    import torch

    gen = torch.Generator().manual_seed(0)
    most = runner.arch.max_position_embeddings
    singles = {(1, min(t, most)) for t in sizes.prefill_tokens}
    calls = sorted(singles | {(k, min(n, most)) for k, n in sizes.prefill_packed}, key=lambda c: (c[0] * c[1], c[0]))
    points = []
    for k, n in calls:
        prompts = [torch.randint(0, runner.arch.vocab_size, (n,), generator=gen).tolist() for _ in range(k)]
        points.append((k, k * n, _typical(lambda p=prompts: runner.prefill(p, None), sizes.repeats)))
    return points


def _decode_points(runner, sizes: ProfileSizes) -> list[tuple[int, int, float]]:
    import torch

    gen = torch.Generator().manual_seed(1)
    contexts = sorted({min(c, runner.arch.max_position_embeddings - 2) for c in sizes.decode_contexts})
    return [(b, c, _decode_time(runner, b, c, sizes.repeats, gen)) for b in sizes.decode_batches for c in contexts]


def _typical(fn, repeats: int) -> float:
    """The median time of `repeats` calls after a warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _decode_time(runner, batch: int, context: int, repeats: int, gen) -> float:
    """The typical time of a serving decode step: `ContinuousBatcher.step` over `batch` running rows (the
    forward, greedy sampling -- what bench serve asks for -- the read-back and stop checks), not the forward
    alone. Eager on CUDA too (no graphs). The warm-up call admits the rows; every call moves each row one
    position on, so the timed calls centre on `context`."""
    from decode_worker.batcher import ContinuousBatcher, DecodeSequence
    from decode_worker.stopping import StopChecker
    from engine.config import SamplingParams

    steps = repeats + 1
    pool, tokens, positions, tables = decode_step_inputs(runner, batch, context, gen, steps)
    batcher = ContinuousBatcher(runner, pool, StopChecker((), None), batch, cuda_graphs=False, overlap=False)
    params = SamplingParams(max_tokens=steps + 2, temperature=0, ignore_eos=True)  # none finishes here
    for i, (token, position, table) in enumerate(zip(tokens.tolist(), positions.tolist(), tables.tolist())):
        batcher.add(DecodeSequence(str(i), prompt_len=position, params=params, block_table=table,
                                   output=[token], token_times=[0.0]))
    seconds = _typical(batcher.step, repeats)
    if len(batcher.running) != batch:
        raise RuntimeError(f"{batch - len(batcher.running)} of {batch} profiled rows left the batch")
    return seconds
