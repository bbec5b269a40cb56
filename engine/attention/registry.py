"""Attention backends by name, imported lazily: a CPU machine never imports CUDA-only code."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from engine.attention.base import AttentionBackend
from engine.attention.torch_ref import TorchBackend

log = logging.getLogger("pdserve.attention")


def _cpu() -> AttentionBackend | None:
    from engine.attention.cpu import CpuBackend

    return CpuBackend.load()


def _triton() -> AttentionBackend | None:
    from engine.attention.triton_backend import TritonBackend

    return TritonBackend.load()


BACKENDS: dict[str, Callable[[], AttentionBackend | None]] = {
    "torch": TorchBackend,
    "cpu": _cpu,
    "triton": _triton,
}


def get_backend(name: str, device: str) -> AttentionBackend:
    """Resolve `auto` to the fastest backend for `device` (CUDA: triton, CPU: the native kernel);
    a backend that cannot load here (no compiler, no Triton) falls back to the torch reference."""
    if name == "auto":
        name = "cpu" if device == "cpu" else "triton"
    if name not in BACKENDS:
        raise ValueError(f"attention backend must be one of {['auto', *BACKENDS]}, got {name!r}")
    if name == "triton" and device != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("the triton attention backend runs on CUDA (or on a CPU under TRITON_INTERPRET=1, "
                         "Triton's interpreter, for tests); use --attention-backend auto or cpu here")
    backend = BACKENDS[name]()
    if backend is None:
        log.warning("attention backend %r is unavailable on %s; using the torch reference", name, device)
        return TorchBackend()
    return backend
