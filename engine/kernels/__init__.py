"""Native kernels, built on first use and cached per source and per CPU kind.

CPU: `paged_attention_cpu.cpp`, decode attention read straight from the paged
pool. It is compiled with -march=native, so the extension's name (torch's
build and cache directory) carries `isa_key` of this CPU's flags: a cache
shared across machines (a home directory on NFS, a baked image) never hands
one CPU code compiled for another. Loading it needs a C++ compiler; without
one, callers fall back to the torch reference path.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from pathlib import Path

from engine.cpu_features import cpu_flags, isa_key

log = logging.getLogger("pdserve.kernels")
_HERE = Path(__file__).resolve().parent


def cpu_extension_name(flags: Iterable[str]) -> str:
    """torch's extension name (and cache folder) for the CPU kernel built on a CPU with these flags."""
    return f"pdserve_paged_attention_cpu_{isa_key(flags)}"


@functools.cache
def cpu_paged_attention():
    """The compiled module, or None when it cannot be built here."""
    try:
        from torch.utils.cpp_extension import load

        return load(name=cpu_extension_name(cpu_flags()), sources=[str(_HERE / "paged_attention_cpu.cpp")],
                    extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffast-math"], extra_ldflags=["-fopenmp"],
                    verbose=False)
    except Exception as e:  # no compiler, no headers: the torch path still works
        log.warning("CPU paged-attention kernel unavailable (%s); using the torch reference path", e)
        return None
