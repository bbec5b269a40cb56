"""`pdserve serve --deployment NAME`: the HTTP server in front of a running deployment's router actor
(started here with `deploy` on the test's local Ray cluster, as `pdserve up` does on a real one)."""

from __future__ import annotations

import json
import time

import httpx2 as httpx
import openai
import pytest

from engine.config import EngineConfig
from pdserve.runtime.backend import leaked_blocks
from pdserve.runtime.cluster import ClusterConfig
from pdserve.runtime.deployment import DeploymentSpec, deploy, teardown
from pdserve.serve.server import ServeOptions, start_server
from router.router import RouterConfig

pytestmark = pytest.mark.slow

ENGINE = EngineConfig(dtype="float32", device="cpu", kv_cache_gib=0.25)
NAME = "servetest"


@pytest.fixture(scope="module")
def server(ray_cluster):
    deploy(DeploymentSpec(NAME, ENGINE, ClusterConfig(), RouterConfig(max_prefill_tokens=256)), address=None)
    try:
        running = start_server(ENGINE, ClusterConfig(), RouterConfig(), ServeOptions(port=0), deployment=NAME)
        yield running
        running.stop()
    finally:
        teardown(NAME, None)


def test_streams_through_a_deployment_and_frees_aborted_blocks(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)
    args = dict(model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Name two planets."}],
                max_tokens=16, temperature=0)
    whole = client.chat.completions.create(**args)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **args))
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1

    body = {"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=300) as resp:
        texts = 0
        for line in resp.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                texts += 1
                if texts == 3:
                    break  # hang up mid-stream
    deadline = time.time() + 60
    while (leaked_blocks(server.workers) or server.loop.router.active) and time.time() < deadline:
        time.sleep(0.2)
    assert leaked_blocks(server.workers) == 0 and not server.loop.router.active
    state = httpx.get(server.url + "/dashboard/api/state").json()
    assert state["summary"]["failed"] == 1, "the hung-up request was aborted, not served to its end"
