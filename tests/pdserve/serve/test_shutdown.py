"""Stopping `pdserve serve` like a server (pdserve/serve/shutdown.py): the drain's steps on a fake loop, and a
real server process sent SIGTERM with 32 streams open."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx2 as httpx
import psutil
import pytest

from engine.config import SamplingParams
from pdserve.observability.metrics import SLO
from pdserve.serve.admission import Admission, AdmissionConfig
from pdserve.serve.errors import ApiError
from pdserve.serve.shutdown import drain_loop
from router.request import Request


def _req(n: int) -> Request:
    return Request(f"r{n}", f"cmpl-{n}", n, "completion", [1, 2, 3], SamplingParams(max_tokens=8))


class FakeLoop:
    """Requests that finish on their own after `finish_after_s` (None: never); aborts end them at once."""

    def __init__(self, finish_after_s: list[float | None]) -> None:
        self.start = time.monotonic()
        self.reqs = {_req(i).request_id: (_req(i), after) for i, after in enumerate(finish_after_s)}
        self.aborted: list[str] = []
        self.closed: tuple[str, int] | None = None

    def close_admission(self, message: str, retry_after_s: int) -> None:
        self.closed = (message, retry_after_s)

    def unfinished(self) -> list[Request]:
        now = time.monotonic() - self.start
        return [r for r, after in self.reqs.values()
                if r.request_id not in self.aborted and (after is None or after > now)]

    def in_flight(self) -> int:
        return len(self.unfinished())

    def abort(self, req: Request, reason: str) -> None:
        assert "shutting down" in reason
        self.aborted.append(req.request_id)


def test_drain_waits_for_what_fits_and_aborts_the_rest():
    loop = FakeLoop([0.1, 0.2, None, None])
    result = drain_loop(loop, timeout_s=0.6, hurry=threading.Event())
    assert loop.closed is not None and loop.closed[1] > 0
    assert (result.in_flight, result.finished, result.aborted) == (4, 2, 2)
    assert sorted(loop.aborted) == ["r2", "r3"]


def test_a_second_signal_aborts_at_once():
    loop = FakeLoop([None, None])
    hurry = threading.Event()
    hurry.set()
    started = time.monotonic()
    result = drain_loop(loop, timeout_s=30, hurry=hurry)
    assert time.monotonic() - started < 5 and result.aborted == 2


def test_a_closed_admission_refuses_with_503_and_retry_after():
    admission = Admission(AdmissionConfig(), SLO())
    admission.admit(_req(0))
    admission.close("the server is shutting down", 5)
    with pytest.raises(ApiError) as refused:
        admission.admit(_req(1))
    assert refused.value.status == 503 and refused.value.headers == {"Retry-After": "5"}
    assert refused.value.code == "shutting_down"


# ---- a real server process ---------------------------------------------------------------------------
SHORT, LONG = 48, 6000  # output tokens: a short stream finishes well within the timeout, a long one cannot
TIMEOUT_S = 3.0


@pytest.fixture(scope="module")
def long_context_model(default_model_dir, tmp_path_factory) -> Path:
    """A tiny random llama with an 8k context (the shared tiny models stop at 512) and the default tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tests.conftest import TINY_COMMON

    folder = tmp_path_factory.mktemp("tiny-8k") / "llama"
    torch.manual_seed(0)
    config = LlamaConfig(**{**TINY_COMMON, "max_position_embeddings": 8192}, tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    for f in default_model_dir.glob("tokenizer*"):
        shutil.copy(f, folder / f.name)
    return folder


@dataclass
class Stream:
    max_tokens: int
    first: threading.Event = field(default_factory=threading.Event)
    events: list[dict] = field(default_factory=list)
    done_marker: bool = False
    error: str = ""

    def run(self, url: str, n: int) -> None:
        body = {"model": "llama", "prompt": [(n * 7 + i) % 250 + 1 for i in range(20)], "max_tokens": self.max_tokens,
                "temperature": 0, "ignore_eos": True, "stream": True}
        try:
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as response:
                for line in response.iter_lines():
                    if line == "data: [DONE]":
                        self.done_marker = True
                    elif line.startswith("data: "):
                        self.events.append(json.loads(line[6:]))
                        self.first.set()
        except Exception as e:  # noqa: BLE001 -- a cut connection is what the test looks for
            self.error = repr(e)
        self.first.set()

    @property
    def completed(self) -> bool:
        return self.done_marker and bool(self.events) and self.events[-1].get("choices", [{}])[0].get(
            "finish_reason") == "length"

    @property
    def error_chunk(self) -> str:
        last = self.events[-1] if self.events else {}
        return last.get("error", {}).get("message", "")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_health(url: str, proc: subprocess.Popen, timeout_s: float = 240) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else "server exited"
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError("the server did not come up")


@pytest.mark.slow
def test_sigterm_drains_32_open_streams_and_exits_cleanly(long_context_model, tmp_path):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pdserve.cli", "serve", "--model", str(long_context_model),
                             "--dtype", "float32", "--device", "cpu", "--kv-cache-gib", "0.25", "--port", str(port),
                             "--prefill-threads", "1", "--decode-threads", "1", "--max-num-seqs", "32",
                             "--shutdown-timeout", str(TIMEOUT_S)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        _wait_health(url, proc)
        tree = [proc.pid] + [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        streams = [Stream(SHORT if i % 2 else LONG) for i in range(32)]
        threads = [threading.Thread(target=s.run, args=(url, i)) for i, s in enumerate(streams)]
        for t in threads:
            t.start()
        assert all(s.first.wait(120) for s in streams)  # every stream is open (and has its first chunk)
        tree += [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        proc.send_signal(signal.SIGTERM)
        refused = _refused_while_draining(url)
        for t in threads:
            t.join(120)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err, err
    assert "draining" in err and "aborting" in err and "workers stopped" in err, err
    assert refused.status_code == 503 and refused.headers.get("retry-after"), refused.text
    for s in streams:
        assert not s.error, s.error
        assert s.done_marker  # every stream ends properly, with [DONE]
        if s.max_tokens == SHORT:  # fits the timeout: it completes
            assert s.completed, s.events[-1]
        else:  # cannot fit: an error chunk that says why
            assert not s.completed and "shutting down" in s.error_chunk, s.events[-1]
    _assert_gone(set(tree))


def _refused_while_draining(url: str) -> httpx.Response:
    """A request sent once the server says it is draining (/health 503)."""
    deadline = time.time() + 30
    while time.time() < deadline:
        if httpx.get(url + "/health", timeout=5).status_code == 503:
            break
        time.sleep(0.05)
    body = {"model": "llama", "prompt": [1, 2, 3], "max_tokens": 4}
    return httpx.post(url + "/v1/completions", json=body, timeout=10)


def _assert_gone(pids: set[int], timeout_s: float = 15) -> None:
    """No process of the server's tree alive (zombies awaiting their reaper do not count), no shm pool of theirs."""
    deadline = time.time() + timeout_s
    while True:
        alive = [p for p in pids if _running(p)]
        if not alive or time.time() > deadline:
            break
        time.sleep(0.5)
    assert not alive, alive
    segments = [f for f in os.listdir("/dev/shm") if f.startswith("pdserve-kv-")]
    assert not [f for f in segments if int(f.split("-")[2]) in pids], segments


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
