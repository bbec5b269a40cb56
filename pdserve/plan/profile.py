"""Per-stage step times measured on this hardware, fitted to the linear models the planner uses.

    prefill of T packed tokens:            t = a + b*T
    decode step of B sequences at context C: t = c + d*B + e*B*C

Each point is the minimum over repeats: on a shared machine the minimum is the least disturbed
reading. Decode steps run over a KV pool of zeros: a step's time does not depend on the cached values,
so the contexts need no prefill first. Steps run eagerly through ModelRunner.decode: on CUDA the
decode worker replays CUDA graphs, so a GPU profile overstates its fixed step cost.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

PROFILE_VERSION = 1


@dataclass(frozen=True)
class PrefillFit:
    a_s: float  # fixed cost of one prefill call, seconds
    b_s_per_token: float

    def time(self, tokens: float) -> float:
        return self.a_s + self.b_s_per_token * tokens


@dataclass(frozen=True)
class DecodeFit:
    c_s: float  # fixed cost of one step
    d_s_per_seq: float
    e_s_per_seq_token: float  # attention: per sequence per token of context

    def time(self, batch: float, context: float) -> float:
        return self.c_s + self.d_s_per_seq * batch + self.e_s_per_seq_token * batch * context


@dataclass(frozen=True)
class StageProfile:
    """What the planner needs from the hardware; written and read as JSON (`--profile-out`, `--profile`)."""

    prefill: PrefillFit
    decode: DecodeFit
    kv_bytes_per_token: int  # all layers, K and V: what one prompt token costs the KV transfer
    num_layers: int
    threads: int  # torch threads the timings were taken with (the per-worker CPU share)
    description: str = ""  # model, dtype, device, CPU
    prefill_points: tuple[tuple[int, float], ...] = ()  # (tokens, seconds)
    decode_points: tuple[tuple[int, int, float], ...] = ()  # (batch, context, seconds)

    def to_json(self) -> str:
        return json.dumps({"version": PROFILE_VERSION, **asdict(self)}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> StageProfile:
        d = json.loads(text)
        if not isinstance(d, dict) or d.pop("version", None) != PROFILE_VERSION:
            raise ValueError(f"not a pdserve plan profile (version {PROFILE_VERSION})")
        try:
            return cls(prefill=PrefillFit(**d.pop("prefill")), decode=DecodeFit(**d.pop("decode")),
                       prefill_points=tuple(tuple(p) for p in d.pop("prefill_points", ())),
                       decode_points=tuple(tuple(p) for p in d.pop("decode_points", ())), **d)
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed pdserve plan profile: {e}") from None

    def save(self, path: Path) -> None:
        path.write_text(self.to_json())

    @classmethod
    def load(cls, path: Path) -> StageProfile:
        return cls.from_json(path.read_text())


def fit_prefill(points: list[tuple[int, float]]) -> PrefillFit:
    a, b = _nonneg_lstsq([[1.0, t] for t, _ in points], [s for _, s in points])
    return PrefillFit(a, b)


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
    prefill_tokens: tuple[int, ...] = (32, 128, 512, 1024)
    decode_batches: tuple[int, ...] = (1, 8, 32)  # 32 x 1024 tokens: a 0.75 GiB pool on the default model
    decode_contexts: tuple[int, ...] = (128, 1024)
    repeats: int = 3


QUICK_SIZES = ProfileSizes(prefill_tokens=(16, 64, 128), decode_batches=(1, 4), decode_contexts=(32, 96), repeats=2)


def measure(runner, sizes: ProfileSizes, threads: int, description: str = "") -> StageProfile:
    """Time prefill and decode on `runner` (an engine.runner.ModelRunner) with `threads` torch threads."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    max_pos = runner.arch.max_position_embeddings
    gen = torch.Generator().manual_seed(0)
    vocab = runner.arch.vocab_size
    prefill_points = []
    for n in sorted({min(t, max_pos) for t in sizes.prefill_tokens}):
        prompt = torch.randint(0, vocab, (n,), generator=gen).tolist()
        prefill_points.append((n, _best(lambda p=prompt: runner.prefill([p], None), sizes.repeats)))
    contexts = sorted({min(c, max_pos - 2) for c in sizes.decode_contexts})  # room for the step's token
    decode_points = [(b, c, _decode_time(runner, b, c, sizes.repeats, gen))
                     for b in sizes.decode_batches for c in contexts]
    a = runner.arch
    return StageProfile(prefill=fit_prefill(prefill_points), decode=fit_decode(decode_points),
                        kv_bytes_per_token=runner.kv_layout(num_blocks=1).bytes_per_token,  # int8 KV: + scales
                        num_layers=a.num_layers, threads=torch.get_num_threads(), description=description,
                        prefill_points=tuple(prefill_points), decode_points=tuple(decode_points))


def _best(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _decode_time(runner, batch: int, context: int, repeats: int, gen) -> float:
    """One decode step of `batch` sequences each at position `context`, over a zeroed pool."""
    import torch

    from engine.kv_cache import KVPool

    layout = runner.kv_layout(num_blocks=1)
    per_seq = layout.blocks_for(context + 1)
    layout = runner.kv_layout(num_blocks=batch * per_seq)
    pool = KVPool.allocate(layout, str(runner.device))
    tables = torch.arange(batch * per_seq, dtype=torch.int32).view(batch, per_seq).to(runner.device)
    tokens = torch.randint(0, runner.arch.vocab_size, (batch,), generator=gen).to(runner.device)
    positions = torch.full((batch,), context, dtype=torch.long, device=runner.device)
    return _best(lambda: runner.decode(pool, tokens, positions, tables), repeats)
