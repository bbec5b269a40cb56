"""Per-CPU choices: `--dtype auto` and the native kernel's cache key, from given sets of CPU flags."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from engine.config import EngineConfig
from engine.cpu_features import CpuInfo, auto_dtype, cpu_flags, isa_features, isa_key, native_bf16
from engine.kernels import cpu_extension_name

AVX2_ONLY = frozenset("fpu sse4_2 avx f16c fma avx2 bmi2".split())  # an AVX2-only EPYC: no native bf16
ZEN4 = AVX2_ONLY | {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16"}
SAPPHIRE_RAPIDS = ZEN4 | {"avx512_fp16", "amx_tile", "amx_bf16", "amx_int8"}


def test_auto_dtype_is_fp32_without_native_bf16():
    assert not native_bf16(AVX2_ONLY)
    assert auto_dtype("cpu", AVX2_ONLY) == "float32"
    assert auto_dtype("cpu", frozenset()) == "float32"  # flags unreadable: the safe choice


@pytest.mark.parametrize("flags", [ZEN4, SAPPHIRE_RAPIDS, AVX2_ONLY | {"amx_bf16"}])
def test_auto_dtype_is_bf16_with_avx512_bf16_or_amx(flags):
    assert native_bf16(flags)
    assert auto_dtype("cpu", flags) == "bfloat16"


def test_auto_dtype_on_cuda_is_bf16_whatever_the_host_cpu():
    assert auto_dtype("cuda", AVX2_ONLY) == "bfloat16"


def test_engine_config_defaults_to_auto_and_resolves_to_a_concrete_dtype():
    config = EngineConfig(device="cpu")
    assert config.dtype == "auto"
    with pytest.raises(ValueError, match="resolved"):
        config.torch_dtype  # noqa: B018  # a consumer that skips resolution must not guess
    resolved = config.resolved()
    assert resolved.dtype == auto_dtype("cpu", cpu_flags())
    assert resolved.torch_dtype in (torch.float32, torch.bfloat16)
    assert resolved.resolved() is resolved
    explicit = replace(config, dtype="float32")  # an explicit dtype is never overridden
    assert explicit.resolved().dtype == "float32"
    with pytest.raises(ValueError, match="--dtype"):
        EngineConfig(dtype="int4")


def test_isa_features_and_description():
    assert isa_features(SAPPHIRE_RAPIDS)[-3:] == ("amx_tile", "amx_bf16", "amx_int8")
    assert "bmi2" not in isa_features(AVX2_ONLY) and "avx2" in isa_features(AVX2_ONLY)
    line = CpuInfo("Some EPYC", isa_features(AVX2_ONLY), native_bf16(AVX2_ONLY)).describe("float32")
    assert line == "CPU Some EPYC (sse4_2 avx f16c fma avx2; no native bf16); dtype float32"
    here = CpuInfo.here()
    assert here.model and here.native_bf16 == native_bf16(cpu_flags())


def test_kernel_cache_key_differs_per_cpu_kind():
    names = {cpu_extension_name(f) for f in (AVX2_ONLY, ZEN4, SAPPHIRE_RAPIDS, AVX2_ONLY - {"bmi2"})}
    assert len(names) == 4  # any flag -march=native may use changes the key
    assert cpu_extension_name(AVX2_ONLY).startswith("pdserve_cpu_kernels_avx2_")
    assert isa_key(ZEN4).startswith("avx512_") and isa_key(SAPPHIRE_RAPIDS).startswith("amx_")
    assert isa_key(sorted(ZEN4)) == isa_key(reversed(sorted(ZEN4)))  # order does not matter
    assert cpu_extension_name(cpu_flags()).isidentifier()  # a valid Python module name


def test_kernel_is_built_into_its_cpu_keyed_folder_and_imported_from_there():
    from engine.kernels import build_dir, cpu_kernels

    module = cpu_kernels()
    assert module is not None, "the native CPU kernel did not build (needs a C++ compiler)"
    name = cpu_extension_name(cpu_flags())
    assert Path(module.__file__) == build_dir(name) / f"{name}.so"


def test_status_prints_each_workers_dtype_and_cpu(capsys):
    from pdserve.cli.deployment import print_status

    line = CpuInfo("Some EPYC", isa_features(AVX2_ONLY), False).describe("float32")
    worker = {"node_ip": "10.0.0.1", "pid": 1, "device": "cpu", "gpu": None, "threads": 2, "dtype": "float32",
              "cpu": line}
    print_status({"name": "d", "model": "default", "dtype": "auto", "uptime_s": 1, "in_flight": 0, "queued": 0,
                   "workers": [dict(worker, worker_id="prefill-0"), dict(worker, worker_id="decode-0", num_blocks=8,
                                                                         free_blocks=8, running=0)]})
    out = capsys.readouterr().out
    assert "(auto)" in out and out.count(" float32 ") == 2 and "0/8" in out
    assert out.strip().endswith(line) and out.count("Some EPYC") == 1  # one line per kind of CPU
