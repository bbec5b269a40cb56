"""Native kernels, built on first use and cached (torch's extension cache, keyed by source).

CPU: `paged_attention_cpu.cpp`, decode attention read straight from the paged
pool. Loading it needs a C++ compiler; without one, callers fall back to the
torch reference path.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

log = logging.getLogger("pdserve.kernels")
_HERE = Path(__file__).resolve().parent


@functools.cache
def cpu_paged_attention():
    """The compiled module, or None when it cannot be built here."""
    try:
        from torch.utils.cpp_extension import load

        return load(name="pdserve_paged_attention_cpu", sources=[str(_HERE / "paged_attention_cpu.cpp")],
                    extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffast-math"], extra_ldflags=["-fopenmp"],
                    verbose=False)
    except Exception as e:  # no compiler, no headers: the torch path still works
        log.warning("CPU paged-attention kernel unavailable (%s); using the torch reference path", e)
        return None
