"""Token bitmasks: filled on the CPU by the requests' matchers, applied to the logits in one batched op.

    bitmask  [rows, ceil(V / 32)] int32, CPU     bit t % 32 of word t // 32: token t allowed
    logits   [B, V] float32, any device           rows[i] of the logits takes bitmask row i

Filling runs where the caller says: inline, or on one helper thread while the model's forward runs
(`MaskFiller(overlap=True)`). llguidance computes a mask without the GIL, so the helper overlaps
the forward; whether that pays on a machine whose cores the forward already uses is measured in
docs/structured_outputs.md. Unconstrained rows are left as they are.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from engine.structured.matcher import Matcher

# Byte value -> its 8 bits, low bit first: a little-endian int32 mask read as bytes unpacks in one gather.
_BITS = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).bool()


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def unpack(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[rows, W] int32 -> [rows, vocab_size] bool (True: allowed), on the bitmask's device."""
    as_bytes = bitmask.contiguous().view(torch.uint8)  # [rows, 4W], little-endian words
    return _BITS.to(bitmask.device)[as_bytes.long()].flatten(1)[:, :vocab_size]


@torch.inference_mode()  # logits come from the model's inference mode: only there may they change in place
def apply_bitmask_(logits: torch.Tensor, bitmask: torch.Tensor, rows: Sequence[int] | None = None) -> None:
    """Set the logits of forbidden tokens to -inf, in place. rows: the logits row of each bitmask row
    (None: row i is row i). On a CPU the native kernel (engine/kernels/token_bitmask_cpu.cpp: 12.6 ms ->
    0.3 ms CPU at 64 x 49,152, one thread) where it builds; else, and on a GPU, torch ops."""
    kernel = _native() if logits.device.type == "cpu" and logits.dtype == torch.float32 else None
    if kernel is not None and logits.is_contiguous():
        index = torch.arange(len(bitmask)) if rows is None else torch.tensor(list(rows), dtype=torch.long)
        kernel.apply_token_bitmask(logits, bitmask.contiguous(), index)
        return
    apply_bitmask_torch_(logits, bitmask, rows)


@torch.inference_mode()
def apply_bitmask_torch_(logits: torch.Tensor, bitmask: torch.Tensor, rows: Sequence[int] | None = None) -> None:
    """apply_bitmask_ with torch ops: any device and dtype, and the native kernel's reference. The packed
    bitmask crosses to the logits' device (4 bytes per 32 tokens) and is unpacked there."""
    allowed = unpack(bitmask.to(logits.device, non_blocking=True), logits.shape[-1])
    if rows is None:
        logits.masked_fill_(~allowed, float("-inf"))
        return
    index = torch.tensor(list(rows), dtype=torch.long, device=logits.device)
    logits[index] = logits[index].masked_fill(~allowed, float("-inf"))


def _native():
    from engine.kernels import cpu_token_bitmask

    return cpu_token_bitmask()


def fill_rows(matchers: Sequence[Matcher], vocab_size: int, counters: MaskCounters | None = None) -> torch.Tensor:
    """One bitmask row per matcher."""
    started = time.thread_time()
    words = bitmask_words(vocab_size)
    bitmask = torch.empty(len(matchers), words, dtype=torch.int32)
    base, row_bytes = bitmask.data_ptr(), words * 4
    for i, m in enumerate(matchers):  # no tensor view per row: this loop shares the GIL with the forward's thread
        m.fill_at(base + i * row_bytes, row_bytes)
    if counters is not None:
        counters.fill_cpu_s += time.thread_time() - started
    return bitmask


class PendingMask:
    """Bitmask rows being filled for some logits rows; `apply` waits for them and masks the logits."""

    def __init__(self, rows: list[int], result: Future[torch.Tensor] | torch.Tensor,
                 counters: MaskCounters | None = None) -> None:
        self.rows, self._result, self._counters = rows, result, counters

    def bitmask(self) -> torch.Tensor:
        return self._result.result() if isinstance(self._result, Future) else self._result

    def apply(self, logits: torch.Tensor) -> None:
        started = time.perf_counter()
        bitmask = self.bitmask()
        waited = time.perf_counter()
        apply_bitmask_(logits, bitmask, None if self.rows == list(range(logits.shape[0])) else self.rows)
        if self._counters is not None:
            self._counters.wait_s += waited - started
            self._counters.apply_s += time.perf_counter() - waited


class MaskCounters:
    """Where a worker's mask time goes: CPU seconds filling rows (on whichever thread fills), wall seconds
    the step waited for a fill still running, and seconds applying masks to logits; rows and steps masked."""

    def __init__(self) -> None:
        self.steps = self.rows = 0
        self.fill_cpu_s = self.wait_s = self.apply_s = 0.0

    def snapshot(self) -> dict[str, float]:
        return {"mask_steps": self.steps, "mask_rows": self.rows, "mask_fill_cpu_s": self.fill_cpu_s,
                "mask_wait_s": self.wait_s, "mask_apply_s": self.apply_s}


class MaskFiller:
    """Fills the constrained rows of a step, inline or on one helper thread (`overlap`)."""

    def __init__(self, vocab_size: int, overlap: bool = False) -> None:
        self.vocab_size = vocab_size
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-mask") if overlap else None
        self.counters = MaskCounters()

    def begin(self, grammars: Sequence[Matcher | None]) -> PendingMask | None:
        """Start filling a mask for each row that has a matcher (row i of the logits is grammars[i]);
        None when no row is constrained. The matchers must not change until `apply` returned."""
        rows = [i for i, g in enumerate(grammars) if g is not None]
        if not rows:
            return None
        matchers = [grammars[i] for i in rows]
        c = self.counters
        c.steps, c.rows = c.steps + 1, c.rows + len(rows)
        if self._pool is None:
            return PendingMask(rows, fill_rows(matchers, self.vocab_size, c), c)
        return PendingMask(rows, self._pool.submit(fill_rows, matchers, self.vocab_size, c), c)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
