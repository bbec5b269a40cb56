"""`pdserve serve` with structured outputs and tools, through the official `openai` client (real uvicorn,
Ray workers and the default model in fp32, greedy): `client.beta.chat.completions.parse` with a pydantic
model, tool calls whole and streamed (the deltas add up to the whole answer), a bad schema refused with
400 and OpenAI's error body before anything is queued, the metrics counting constrained answers, and no
KV block left held."""

from __future__ import annotations

import json

import httpx2 as httpx
import openai
import pytest
from pydantic import BaseModel, Field

from engine.config import EngineConfig
from pdserve.runtime.cluster import ClusterConfig
from pdserve.serve.server import ServeOptions, start_server
from router.router import RouterConfig
from tests.pdserve.serve.test_serve import _wait_idle

pytestmark = pytest.mark.slow

ENGINE = EngineConfig(dtype="float32", device="cpu", kv_cache_gib=0.25)
MODEL = "SmolLM2-135M-Instruct"
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "maxLength": 24},
                                                "unit": {"enum": ["celsius", "fahrenheit"]}},
                                                "required": ["city", "unit"], "additionalProperties": False}}}


class Person(BaseModel):
    name: str = Field(max_length=30)
    age: int = Field(ge=0, le=130)
    city: str = Field(max_length=30)


@pytest.fixture(scope="module")
def server(ray_cluster):
    running = start_server(ENGINE, ClusterConfig(), RouterConfig(max_prefill_tokens=256), ServeOptions(port=0))
    yield running
    running.stop()


@pytest.fixture()
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)


def test_parse_with_a_pydantic_model(client, server):
    completion = client.beta.chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": "Extract: Alice Johnson, 34, lives in Paris."}],
        response_format=Person, max_tokens=80, temperature=0)
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Person), choice.message.content
    assert Person.model_validate_json(choice.message.content) == choice.message.parsed
    assert _wait_idle(server) == 0


def test_tool_calls_whole_and_streamed_add_up_to_the_same_answer(client, server):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "What's the weather in Paris?"}],
                  tools=[WEATHER], tool_choice="required", max_tokens=80, temperature=0)
    whole = client.chat.completions.create(**kwargs).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.message.content is None
    calls = [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    assert calls and calls[0][0] == "get_weather"
    args = json.loads(calls[0][1])
    assert set(args) == {"city", "unit"} and args["unit"] in ("celsius", "fahrenheit")
    streamed: dict[int, list[str]] = {}
    content, reasons, ids = "", [], {}
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for tc in delta.tool_calls or []:
            entry = streamed.setdefault(tc.index, ["", ""])
            entry[0] += (tc.function.name or "") if tc.function else ""
            entry[1] += (tc.function.arguments or "") if tc.function else ""
            if tc.id:
                ids[tc.index] = tc.id
        reasons.append(chunk.choices[0].finish_reason)
    assert [tuple(v) for _, v in sorted(streamed.items())] == calls
    assert content == "" and reasons[-1] == "tool_calls" and all(i.startswith("call_") for i in ids.values())
    assert _wait_idle(server) == 0


def test_bad_schema_is_a_400_naming_the_keyword_and_metrics_count_constrained_answers(client, server):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=8,
            response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": {
                "type": "object", "properties": {"xs": {"type": "array", "uniqueItems": True}}}}})
    assert e.value.status_code == 400
    err = e.value.body
    assert err["code"] == "unsupported_schema" and "uniqueItems" in err["message"] and err["type"] == \
        "invalid_request_error"
    assert not server.loop.router.active  # refused before it was queued
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Is water wet?"}],
                                   max_tokens=8, temperature=0, extra_body={"guided_choice": ["yes", "no"]})
    metrics = httpx.get(server.url + "/metrics", timeout=30).text
    counted = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
               if line.startswith(("pdserve_constrained_requests_total", "pdserve_constraint_validation_failures"))}
    assert counted['pdserve_constrained_requests_total{kind="choice"}'] >= 1
    assert counted["pdserve_constraint_validation_failures_total"] == 0
