"""Native kernels, built on first use and cached per source, torch and CPU kind.

CPU: `paged_attention_cpu.cpp`, decode attention read straight from the paged
pool. It is compiled with -march=native, so the extension's name (and build
folder) carries `isa_key` of this CPU's flags: a cache shared across machines
(a home directory on NFS, a baked image) never hands one CPU code compiled for
another. The name also hashes the source, flags and torch version, so a built
module is imported directly, without torch's build machinery (seconds of
imports and a ninja run per process). Loading it needs a C++ compiler the
first time; without one, callers fall back to the torch reference path.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import sys
from collections.abc import Iterable
from pathlib import Path

from engine.cpu_features import cpu_flags, isa_key

log = logging.getLogger("pdserve.kernels")
_HERE = Path(__file__).resolve().parent
_SOURCE = _HERE / "paged_attention_cpu.cpp"
_CFLAGS = ("-O3", "-march=native", "-fopenmp", "-ffast-math")


@functools.cache
def _build_key() -> str:
    """What else decides the binary: the source, the flags, torch and Python."""
    import torch

    text = f"{_SOURCE.read_bytes().hex()} {_CFLAGS} {torch.__version__} {sys.version_info[:2]}"
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def cpu_extension_name(flags: Iterable[str]) -> str:
    """The CPU kernel's module name (and build folder) on a CPU with these flags."""
    return f"pdserve_paged_attention_cpu_{isa_key(flags)}_{_build_key()}"


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
def cpu_paged_attention():
    """The compiled module, or None when it cannot be built here."""
    name = cpu_extension_name(cpu_flags())
    folder = build_dir(name)
    try:
        import torch  # noqa: F401  # the module links against libtorch

        module = _import_built(name, folder)
        if module is not None:
            return module
        from torch.utils.cpp_extension import load

        folder.mkdir(parents=True, exist_ok=True)
        return load(name=name, sources=[str(_SOURCE)], extra_cflags=list(_CFLAGS), extra_ldflags=["-fopenmp"],
                    build_directory=str(folder), verbose=False)
    except Exception as e:  # no compiler, no headers: the torch path still works
        log.warning("CPU paged-attention kernel unavailable (%s); using the torch reference path", e)
        return None
