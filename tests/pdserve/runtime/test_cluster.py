"""Launching on a Ray cluster: placement on labelled nodes, and a deployment driven through `ray start`."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.system.test_faults import outputs, write_batch

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[3]

MULTI_NODE = textwrap.dedent("""
    import json, sys
    import ray
    from ray.cluster_utils import Cluster
    from engine.config import EngineConfig
    from pdserve.runtime.cluster import ClusterConfig, WorkerResources
    from pdserve.batch.run import BatchOptions, run_batch
    from router.router import RouterConfig
    from pathlib import Path

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    prefill_node = cluster.add_node(num_cpus=1, resources={"prefill": 1}, labels={"pdserve-role": "prefill"})
    decode_node = cluster.add_node(num_cpus=1, resources={"decode": 1}, labels={"pdserve-role": "decode"})
    ray.init(address=cluster.address, namespace="pdserve")
    config = ClusterConfig(
        address=cluster.address,
        prefill=WorkerResources.parse(1, 0, "prefill=1", "pdserve-role=prefill"),
        decode=WorkerResources.parse(1, 0, "decode=1", "pdserve-role=decode"))
    seen = {}

    def where(router):
        if not seen:
            for role, handles in (("prefill", router.workers.prefill), ("decode", router.workers.decode)):
                for h in handles.values():
                    seen[role] = ray.get(h.where.remote()).node_id

    summary = run_batch(Path(sys.argv[1]), Path(sys.argv[2]),
                        EngineConfig(dtype="float32", device="cpu", kv_cache_gib=0.25), config, RouterConfig(),
                        BatchOptions(progress=False), on_tick=where)
    print(json.dumps({"succeeded": summary.succeeded, "failed": summary.failed, "seen": seen,
                      "prefill_node": prefill_node.node_id, "decode_node": decode_node.node_id,
                      "leaked": summary.kv_blocks_leaked}))
    ray.shutdown()
    cluster.shutdown()
""")


def test_two_labelled_nodes_prefill_and_decode_land_where_asked(tmp_path):
    inp = write_batch(tmp_path / "in.jsonl", n=12, max_tokens=8)
    out = tmp_path / "out.jsonl"
    proc = subprocess.run([sys.executable, "-c", MULTI_NODE, str(inp), str(out)], capture_output=True, text=True,
                          timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["succeeded"] == 12 and result["failed"] == 0 and result["leaked"] == 0
    assert result["seen"]["prefill"] == result["prefill_node"]
    assert result["seen"]["decode"] == result["decode_node"]
    recs = outputs(out)
    assert {r["pdserve"]["transport"] for r in recs.values()} == {"grpc"}  # chosen from placement


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(*args: str, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert proc.returncode == 0, f"{args}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _stop_cluster(temp_dir: str) -> None:
    """Stop only the cluster started under `temp_dir` (`ray stop` would stop every Ray on the machine)."""
    import psutil

    roots = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if temp_dir in " ".join(p.info["cmdline"] or []):
                roots.append(p)
        except psutil.Error:
            continue
    procs = {p.pid: p for root in roots for p in [root, *root.children(recursive=True)]}
    for p in procs.values():
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(list(procs.values()), timeout=15)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()


def test_ray_start_up_status_submit_down(tmp_path):
    import tempfile

    temp_dir = tempfile.mkdtemp(prefix="/tmp/rt")  # short: Ray's unix sockets live under it
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", RAY_worker_niceness="0")
    env.pop("RAY_ADDRESS", None)
    gcs, dash, agent, agent_grpc = _free_port(), _free_port(), _free_port(), _free_port()
    address = f"127.0.0.1:{gcs}"
    # Ray resolves a loopback address to the node IP for drivers, so the head keeps its default node IP;
    # the job server (dashboard) listens on loopback only.
    _run(str(bin_dir / "ray"), "start", "--head", f"--port={gcs}",
         "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         # Own agent ports: the test session's local cluster already holds Ray's defaults.
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--temp-dir={temp_dir}", "--disable-usage-stats", env=env, timeout=180)
    try:
        pdserve = [sys.executable, "-m", "pdserve.cli"]
        up = _run(*pdserve, "up", "--name", "ci", "--address", address, "--dtype", "float32",
                  "--kv-cache-gib", "0.25", env=env)
        assert "deployment 'ci' is up" in up.stdout
        status = _run(*pdserve, "status", "--name", "ci", "--address", address, env=env)
        for worker in ("prefill-0", "decode-0"):
            assert worker in status.stdout
        assert "cpu" in status.stdout and "/" in status.stdout  # device and KV blocks used/total
        inp = write_batch(tmp_path / "in.jsonl", n=10, max_tokens=8)
        out = tmp_path / "out.jsonl"
        submit = _run(*pdserve, "submit", "-i", str(inp), "-o", str(out), "--address", f"http://127.0.0.1:{dash}",
                      "--python", sys.executable, "--deployment", "ci", env=env)
        assert "succeeded; results" in submit.stdout
        recs = outputs(out)
        assert len(recs) == 10 and all(r["error"] is None for r in recs.values())
        assert all(len(r["pdserve"]["output_token_ids"]) >= 1 for r in recs.values())
        _run(*pdserve, "down", "--name", "ci", "--address", address, env=env)
        gone = subprocess.run([*pdserve, "status", "--name", "ci", "--address", address], capture_output=True,
                              text=True, env=env, cwd=ROOT, timeout=120)
        assert gone.returncode != 0 and "no pdserve deployment named 'ci'" in gone.stderr
    finally:
        _stop_cluster(temp_dir)
