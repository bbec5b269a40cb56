"""Batches that go wrong: dirty input, interrupted runs, and a load far larger than one prefill batch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.config import EngineConfig
from pdserve.batch.run import BatchOptions, run_batch
from pdserve.runtime.cluster import ClusterConfig
from router.router import RouterConfig
from tests.system.test_faults import outputs, write_batch

pytestmark = pytest.mark.slow

VALID = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4, "temperature": 0}


def req(cid, body=None, url="/v1/chat/completions", **top) -> str:
    obj = {"custom_id": cid, "method": "POST", "url": url, "body": VALID if body is None else body}
    obj.update(top)
    return json.dumps(obj)


MALFORMED = [
    ("{this is not json", "invalid_json"),
    ("[1, 2, 3]", "must be a JSON object"),
    ('"just a string"', "must be a JSON object"),
    (json.dumps({"method": "POST", "url": "/v1/chat/completions", "body": VALID}), "custom_id"),
    (req(17), "custom_id"),
    (req("bad-url", url="/v1/embeddings"), "unsupported_url"),
    (req("bad-method", method="DELETE"), "method"),
    (req("no-body", body=[]), "body must be"),
    (req("empty-messages", {"messages": []}), "non-empty list"),
    (req("bad-role", {"messages": [{"role": "robot", "content": "x"}]}), "role"),
    (req("no-content", {"messages": [{"role": "user"}]}), "content"),
    (req("bad-model", {**VALID, "model": "gpt-5"}), "model_not_found"),
    (req("zero-tokens", {**VALID, "max_tokens": 0}), "max_tokens"),
    (req("str-tokens", {**VALID, "max_tokens": "ten"}), "max_tokens"),
    (req("too-many-tokens", {**VALID, "max_tokens": 100_000}), "context_length_exceeded"),
    (req("long-prompt", {"prompt": "lorem ipsum " * 6000, "max_tokens": 4}, url="/v1/completions"),
     "context_length_exceeded"),
    (req("neg-temp", {**VALID, "temperature": -0.5}), "temperature"),
    (req("top-p-zero", {**VALID, "top_p": 0}), "top_p"),
    (req("top-p-big", {**VALID, "top_p": 1.01}), "top_p"),
    (req("bad-seed", {**VALID, "seed": 1.5}), "seed"),
    (req("bad-stop", {**VALID, "stop": [None]}), "stop"),
    (req("n-two", {**VALID, "n": 2}), "n must be 1"),
    (req("empty-prompt", {"prompt": "", "max_tokens": 4}, url="/v1/completions"), "prompt"),
    (req("valid-0"), None),  # the duplicate below refers to this id
    (req("valid-0"), "duplicate_custom_id"),
]


def test_malformed_lines_get_clear_errors_and_the_rest_completes(ray_cluster, tmp_path):
    parts: list[bytes] = []
    valid = 0
    for i, (text, error) in enumerate(MALFORMED):
        parts.append(text.encode())
        valid += error is None
        parts.append(req(f"ok-{i}").encode())  # valid lines between the bad ones
        valid += 1
    # Two byte-level faults: invalid UTF-8 (line 6) and a 10 MB line (line 7).
    parts.insert(5, b'{"custom_id": "bin\xff\xfe", "url": "/v1/completions"}')
    parts.insert(6, b'{"custom_id": "huge", "body": {"prompt": "' + b"x" * (10 << 20) + b'"}}')
    inp = tmp_path / "dirty.jsonl"
    inp.write_bytes(b"\n".join(parts) + b"\n")
    out = tmp_path / "out.jsonl"
    summary = run_batch(inp, out, EngineConfig(dtype="float32", device="cpu", kv_cache_gib=0.25), ClusterConfig(),
                        RouterConfig(), BatchOptions(progress=False))
    records = [json.loads(line) for line in out.read_text().splitlines()]
    by_line = {r["pdserve"]["line"]: r for r in records}
    assert len(records) == len(parts) == len(by_line), "one output line per input line"
    bad = [r for r in records if r["error"] is not None]
    good = [r for r in records if r["error"] is None]
    assert len(bad) == len(parts) - valid >= 20
    assert len(good) == valid and all(r["response"]["status_code"] == 200 for r in good)
    assert by_line[6]["error"]["code"] == "invalid_encoding"
    assert by_line[7]["error"]["code"] == "line_too_long"
    expected = [e for _, e in MALFORMED if e is not None]
    messages = [f"{r['error']['code']}: {r['error']['message']}" for r in bad if r["pdserve"]["line"] not in (6, 7)]
    assert len(messages) == len(expected)
    for want in expected:  # each kind of fault is named in its line's error
        assert any(want in m for m in messages), f"no error mentions {want!r}"
    assert summary.succeeded == valid and summary.kv_blocks_leaked == 0


def test_missing_input_and_unwritable_output_fail_before_any_work(tmp_path):
    from pdserve.cli import main

    assert main(["run-batch", "-i", str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "o.jsonl")]) == 2
    inp = write_batch(tmp_path / "in.jsonl", n=1)
    assert main(["run-batch", "-i", str(inp), "-o", str(tmp_path / "no-such-dir" / "o.jsonl")]) == 2
    (tmp_path / "empty.jsonl").write_text("\n\n")
    assert main(["run-batch", "-i", str(tmp_path / "empty.jsonl"), "-o", str(tmp_path / "o.jsonl")]) == 2


def _cli(inp: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pdserve.cli", "run-batch", "-i", str(inp), "-o", str(out),
                             "-q", "--kv-cache-gib", "0.25", "--max-prefill-tokens", "256"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_for_lines(out: Path, n: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if out.exists() and len(out.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.2)
    raise AssertionError(f"never reached {n} output lines")


@pytest.mark.parametrize("how", ["SIGINT", "SIGKILL"])
def test_interrupted_batch_resumes_to_the_same_output(tmp_path, how):
    inp = write_batch(tmp_path / "in.jsonl", n=40, max_tokens=4, spread=120)  # finishes spread over time
    full = tmp_path / "full.jsonl"
    proc = _cli(inp, full)
    assert proc.wait(600) == 0, proc.stderr.read()[-2000:]
    out = tmp_path / "resumed.jsonl"
    proc = _cli(inp, out)
    _wait_for_lines(out, 5, proc)
    if how == "SIGINT":
        proc.send_signal(signal.SIGINT)
        code, err = proc.wait(120), proc.stderr.read()
        assert code == 130 and "Run the same command again" in err, (code, err[-2000:])
    else:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
        proc.wait(60)
    partial = len(out.read_text().splitlines())
    assert 0 < partial < 40, f"interrupt came too late ({partial} lines)"
    proc = _cli(inp, out)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-2000:]
    assert "done by an earlier run" in stdout
    got, want = outputs(out), outputs(full)
    lines = out.read_text().splitlines()
    assert len(lines) == 40 and set(got) == set(want), "each input line exactly once"
    for cid, rec in want.items():
        assert got[cid]["pdserve"]["output_token_ids"] == rec["pdserve"]["output_token_ids"]


def test_five_thousand_requests_with_bounded_memory(ray_cluster, tmp_path, capsys):
    import resource

    n = 5000
    inp = tmp_path / "load.jsonl"
    with open(inp, "w") as f:
        for i in range(n):
            body = {"prompt": f"Item {i}: the colour of the sky is", "max_tokens": 2, "temperature": 0}
            f.write(json.dumps({"custom_id": f"load-{i}", "method": "POST", "url": "/v1/completions",
                                "body": body}) + "\n")
    out = tmp_path / "load-out.jsonl"
    peak = {}

    def sample(router):
        import ray

        if router.active and time.time() - peak.get("t", 0) > 2:
            peak["t"] = time.time()
            for h in list(router.workers.decode.values()) + list(router.workers.prefill.values()):
                rss = ray.get(h.rss_mib.remote(), timeout=30)
                peak["workers"] = max(peak.get("workers", 0), rss)
            peak["queued"] = max(peak.get("queued", 0), len(router.active))

    start = time.time()
    summary = run_batch(inp, out, EngineConfig(dtype="auto", device="cpu", kv_cache_gib=0.5), ClusterConfig(),
                        RouterConfig(), BatchOptions(progress=False, max_pending=1024), on_tick=sample)
    wall = time.time() - start
    records = outputs(out)
    assert summary.succeeded == n and summary.failed == 0 and len(records) == n
    assert len(out.read_text().splitlines()) == n
    assert summary.kv_blocks_leaked == 0
    driver_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert peak["queued"] <= 1024, "the router holds at most max_pending requests"
    with capsys.disabled():
        print(f"\n{n} requests in {wall:.0f}s; peak RSS: driver {driver_mib:.0f} MiB (whole test session), "
              f"largest worker {peak['workers']:.0f} MiB; at most {peak['queued']} requests held")
    assert peak["workers"] < 4096
