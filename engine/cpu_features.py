"""What this CPU computes natively, and the choices that follow from it.

`--dtype auto` picks bf16 only where the CPU multiplies bf16 natively (AMX or
AVX512-BF16): elsewhere torch emulates bf16 matmuls at a small fraction of
fp32's speed. The native kernel is compiled with -march=native, so its build
cache is keyed by the ISA flags (`isa_key`). Everything here is a pure
function of a flag set, except the readers of /proc/cpuinfo.
"""

from __future__ import annotations

import functools
import hashlib
import platform
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# Flags that decide what the compiler and torch emit for our kernels and matmuls, most capable last.
ISA_FLAGS = ("sse4_2", "avx", "f16c", "fma", "avx2", "avx_vnni", "avx512f", "avx512bw", "avx512vl",
             "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8",
             "asimd", "sve", "sve2", "bf16")  # the last four: aarch64's names
NATIVE_BF16 = ("amx_bf16", "avx512_bf16")


def native_bf16(flags: Iterable[str]) -> bool:
    """True when the CPU multiplies bf16 in hardware (AMX or AVX512-BF16)."""
    return not set(NATIVE_BF16).isdisjoint(flags)


def auto_dtype(device: str, flags: Iterable[str]) -> str:
    """`--dtype auto`: bf16 on CUDA and on CPUs with native bf16, fp32 elsewhere."""
    if device == "cuda":
        return "bfloat16"
    return "bfloat16" if native_bf16(flags) else "float32"


def isa_features(flags: Iterable[str]) -> tuple[str, ...]:
    """The flags of ISA_FLAGS this CPU has, in ISA_FLAGS order."""
    have = set(flags)
    return tuple(f for f in ISA_FLAGS if f in have)


def isa_key(flags: Iterable[str]) -> str:
    """A short stable name for code compiled with -march=native on a CPU with these flags.

    All flags count, not only ISA_FLAGS: -march=native enables every extension
    the CPU reports, and code using any one of them faults where it is absent.
    """
    have = set(flags)
    digest = hashlib.sha256(" ".join(sorted(have)).encode()).hexdigest()[:12]
    tier = ("amx" if "amx_tile" in have else "avx512" if "avx512f" in have else "avx2" if "avx2" in have
            else platform.machine() or "cpu")
    return f"{tier}_{digest}"


def _cpuinfo_field(text: str, names: tuple[str, ...]) -> str:
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in names:
            return value.strip()
    return ""


@functools.cache
def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux
        return ""


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (x86 `flags`, aarch64 `Features`); empty where /proc/cpuinfo is absent."""
    return frozenset(_cpuinfo_field(_cpuinfo(), ("flags", "Features")).split())


def cpu_model() -> str:
    return _cpuinfo_field(_cpuinfo(), ("model name", "Model", "Hardware")) or platform.processor() or "unknown CPU"


@dataclass(frozen=True)
class CpuInfo:
    """What `pdserve status` and the benchmarks print about a worker's CPU."""

    model: str
    isa: tuple[str, ...]
    native_bf16: bool

    @classmethod
    def here(cls) -> CpuInfo:
        flags = cpu_flags()
        return cls(cpu_model(), isa_features(flags), native_bf16(flags))

    def describe(self, dtype: str | None = None) -> str:
        bf16 = "native bf16" if self.native_bf16 else "no native bf16"
        chosen = f"; dtype {dtype}" if dtype else ""
        return f"CPU {self.model} ({' '.join(self.isa) or 'no ISA flags read'}; {bf16}){chosen}"
