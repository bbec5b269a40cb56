"""`--address`: omitted, a fresh local cluster (a registered one is never joined); unreachable, a fast error.

Every run gets a private Ray temp dir (RAY_TMPDIR), where the test plants a stale
registration file of a `ray start --head` whose processes died: other Ray
clusters on the machine are neither seen nor disturbed.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import msgpack
import psutil
import pytest


def _dead_address() -> str:
    with socket.socket() as s:  # a port nothing listens on once this socket closes
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def private_ray(tmp_path):
    """Env for a child pdserve: its own Ray temp dir (short: Ray's socket paths must fit 107 bytes) with a
    registration file pointing at a dead head, and no RAY_ADDRESS."""
    root = Path(tempfile.mkdtemp(prefix="pdray", dir="/tmp"))
    (root / "ray").mkdir()
    dead = _dead_address()
    (root / "ray" / "ray_current_cluster").write_text(dead)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=str(root), TMPDIR=str(root))
    yield env, dead
    shutil.rmtree(root, ignore_errors=True)


def _ray_processes_under(root: str) -> list[str]:
    """Live (not zombie) processes of a Ray cluster started with RAY_TMPDIR=root: every one inherits it (Ray's
    agents and workers retitle themselves, so their command lines do not name the temp dir)."""
    found = []
    for p in psutil.process_iter(["pid", "name", "status"]):
        try:
            env = Path(f"/proc/{p.info['pid']}/environ").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile, or not ours
            continue
        if p.info["status"] != psutil.STATUS_ZOMBIE and f"RAY_TMPDIR={root}".encode() in env:
            found.append(f"{p.info['pid']} {p.info['name']}")
    return found


def _one_line_batch(tmp_path: Path) -> Path:
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"custom_id": "one", "method": "POST", "url": "/v1/completions",
                               "body": {"prompt": "Hello", "max_tokens": 1, "temperature": 0}}) + "\n")
    return inp


def _pdserve(env: dict, *args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pdserve.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_stale_registration_does_not_delay_a_plain_run_batch(private_ray, tmp_path, default_model_dir):
    env, dead = private_ray
    out = tmp_path / "out.jsonl"
    proc = _pdserve(env, "run-batch", "-i", str(_one_line_batch(tmp_path)), "-o", str(out), "-q",
                          "--dtype", "float32", "--kv-cache-gib", "0.05", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    left = _ray_processes_under(env["RAY_TMPDIR"])  # run-batch kills its local cluster as it exits (cli.exit_now)
    assert not left, f"Ray processes of the run outlived it: {left}"
    assert json.loads(out.read_text())["error"] is None
    assert "1 requests: 1 succeeded, 0 failed" in proc.stdout, proc.stdout  # the summary, flushed before the exit
    journal = msgpack.Unpacker(open(out.with_name(out.name + ".journal"), "rb"), raw=False)
    assert [e["kind"] for e in journal] == ["header", "done", "complete"]
    # Joining the dead head would sit in GCS connection retries (minutes) and log them.
    assert "Failed to connect to GCS" not in proc.stderr and dead not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("address", ["dead", "ray://dead"])
def test_unreachable_address_fails_within_seconds(private_ray, tmp_path, address):
    # Not `auto`: where exactly one other Ray cluster runs on the machine, Ray's `auto` joins it whatever the
    # registration file says, and this shared test machine may run other people's clusters.
    env, dead = private_ray
    given = address.replace("dead", dead)
    # No timing assert (a loaded machine is slow); a run that sat in GCS retries would pass the 60 s bound and raise.
    proc = _pdserve(env, "run-batch", "-i", str(_one_line_batch(tmp_path)), "-o", str(tmp_path / "o.jsonl"),
                    "--address", given, "--dtype", "float32", timeout=60)
    assert proc.returncode == 2, proc.stderr[-3000:]
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith("pdserve: error: no Ray cluster answers at") and dead in message, message
    assert "ray start --head" in message and "omit --address" in message
