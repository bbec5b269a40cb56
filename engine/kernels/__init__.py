"""Native kernels, built on first use and cached per source, torch and CPU kind.

CPU: `cpu_kernels.cpp`, decode attention read straight from the paged pool
(paged_attention_cpu.h), the fused elementwise ops (fused_ops_cpu.h) and a whole
decode step in C++ (engine/compiled_step.py); `int4_gemv_cpu.cpp`, int4 weights x int8-quantized activations for
decode-shaped matmuls (engine/quant/int4_kernel.py); `token_bitmask_cpu.cpp`, grammar masks
applied to logits (engine/structured/bitmask.py); `moe_experts_cpu.cpp`, bf16 experts' grouped GEMV for
decode (engine/model/moe.py). Each is compiled with
-march=native, so the extension's name (and build folder) carries `isa_key`
of this CPU's flags: a cache shared across machines (a home directory on NFS,
a baked image) never hands one CPU code compiled for another. The name also
hashes the source, flags and torch version, so a built module is imported
directly, without torch's build machinery (seconds of imports and a ninja run
per process). Loading it needs a C++ compiler the first time; without one,
callers fall back to the torch path.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path

from engine.cpu_features import cpu_flags, isa_key

log = logging.getLogger("pdserve.kernels")
_HERE = Path(__file__).resolve().parent
_SOURCE = _HERE / "cpu_kernels.cpp"
# No -ffast-math and no FMA contraction: the kernels round where the torch reference rounds (fused_ops_cpu.h)
# and vectorise through fixed lanes (vec16.h), the same bits on every run.
_CFLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=off")


_INT4_SOURCE = _HERE / "int4_gemv_cpu.cpp"
_INT4_CFLAGS = ("-O3", "-march=native", "-fopenmp")  # no -ffast-math: the activation rounding must be exact
_MOE_SOURCE = _HERE / "moe_experts_cpu.cpp"


@functools.cache
def _build_key(source: Path = _SOURCE, cflags: tuple[str, ...] = _CFLAGS) -> str:
    """What else decides the binary: the source and the headers it includes, the flags, torch and Python."""
    import torch

    text = f"{_source_text(source).hex()} {cflags} {torch.__version__} {sys.version_info[:2]}"
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _source_text(source: Path) -> bytes:
    """The source followed by the local headers it includes (`#include "x.h"`), recursively."""
    text = source.read_bytes()
    for name in re.findall(rb'^#include "([^"]+)"', text, flags=re.M):
        text += _source_text(source.parent / name.decode())
    return text


def cpu_extension_name(flags: Iterable[str], stem: str = "pdserve_cpu_kernels", source: Path = _SOURCE,
                       cflags: tuple[str, ...] = _CFLAGS) -> str:
    """A CPU kernel's module name (and build folder) on a CPU with these flags."""
    return f"{stem}_{isa_key(flags)}_{_build_key(source, cflags)}"


def build_dir(name: str) -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path(
        os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "torch_extensions"
    return Path(root) / "pdserve" / name


def _import_built(name: str, folder: Path):
    """The module built earlier into `folder`, or None."""
    path = folder / f"{name}.so"
    if not path.is_file():
        return None
    try:
        spec = importlib.util.spec_from_loader(name, importlib.machinery.ExtensionFileLoader(name, str(path)))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    except ImportError as e:  # half-written by a concurrent build, or stale: build through torch
        log.debug("cannot import %s (%s); building", path, e)
        return None


@functools.cache
def cpu_kernels():
    """The CPU backend's native module (cpu_kernels.cpp: attention, fused ops, the compiled decode step), or None
    when it cannot be built here."""
    return _load(cpu_extension_name(cpu_flags()), _SOURCE, _CFLAGS, "CPU kernels")


def cpu_kernels_cached() -> bool:
    """True when cpu_kernels() has been built for this CPU and torch already (importing it needs no compiler)."""
    name = cpu_extension_name(cpu_flags())
    return (build_dir(name) / f"{name}.so").is_file()


@functools.cache
def cpu_int4_gemv(cflags: tuple[str, ...] = _INT4_CFLAGS, tier: str | None = None):
    """The int4 GEMV module (-march=native by default), or None when it cannot be built here.

    Other `cflags` (e.g. -mavx2 -mfma -mf16c -mno-avx512f, to test the AVX2 path on an AVX-512 CPU)
    need a `tier` name for the build folder instead of this CPU's ISA key.
    """
    if tier is None and not {"avx2", "fma", "f16c"} <= cpu_flags():
        return None  # the source has no inner loop for this CPU: torch's int4 op serves
    stem = "pdserve_int4_gemv_cpu"
    name = (cpu_extension_name(cpu_flags(), stem, _INT4_SOURCE, cflags) if tier is None
            else f"{stem}_{tier}_{_build_key(_INT4_SOURCE, cflags)}")
    return _load(name, _INT4_SOURCE, cflags, "CPU int4 GEMV kernel")


_BITMASK_SOURCE = _HERE / "token_bitmask_cpu.cpp"
_BITMASK_CFLAGS = ("-O3", "-march=native", "-fopenmp")


@functools.cache
def cpu_token_bitmask():
    """The token-bitmask module, or None when it cannot be built here."""
    name = cpu_extension_name(cpu_flags(), "pdserve_token_bitmask_cpu", _BITMASK_SOURCE, _BITMASK_CFLAGS)
    return _load(name, _BITMASK_SOURCE, _BITMASK_CFLAGS, "CPU token-bitmask kernel")


@functools.cache
def cpu_moe_experts():
    """The bf16 experts' grouped GEMV, or None on a CPU without AVX512-BF16 (or without a compiler):
    engine/model/moe.py keeps torch's grouped_mm there."""
    if "avx512_bf16" not in cpu_flags():
        return None
    name = cpu_extension_name(cpu_flags(), "pdserve_moe_experts_cpu", _MOE_SOURCE, _INT4_CFLAGS)
    module = _load(name, _MOE_SOURCE, _INT4_CFLAGS, "CPU MoE experts kernel")
    return module if module is not None and module.isa() != "none" else None


def _load(name: str, source: Path, cflags: tuple[str, ...], what: str):
    folder = build_dir(name)
    try:
        import torch  # noqa: F401  # the module links against libtorch

        module = _import_built(name, folder)
        if module is not None:
            return module
        from torch.utils.cpp_extension import load

        folder.mkdir(parents=True, exist_ok=True)
        return load(name=name, sources=[str(source)], extra_cflags=list(cflags), extra_ldflags=["-fopenmp"],
                    build_directory=str(folder), verbose=False)
    except Exception as e:  # no compiler, no headers: the torch path still works
        log.warning("%s unavailable (%s); using the torch path", what, e)
        return None
