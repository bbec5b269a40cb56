"""Structured outputs and tool calls through run-batch on a real Ray cluster and the default model (fp32).

One batch of extraction and tool-call requests (JSON schemas, json_object, regex, choice, EBNF, tools with
tool_choice required / named / auto, a bad schema) runs in PD mode; every constrained answer validates,
tool calls come out as message.tool_calls with finish_reason "tool_calls", the bad line is an error
record naming the keyword, and no KV block leaks. The same batch in colocated mode, with a decode
worker killed mid-batch (its requests retried), and with ngram speculative decoding gives the same
tokens for every request.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import jsonschema
import pytest

from engine.config import EngineConfig
from pdserve.batch.run import BatchOptions, run_batch
from pdserve.runtime.cluster import ClusterConfig
from router.request import State
from router.router import RouterConfig
from tests.system.test_faults import KillOnce, outputs

pytestmark = pytest.mark.slow

ENGINE = EngineConfig(dtype="float32", device="cpu", kv_cache_gib=0.25)
NAME = {"type": "string", "minLength": 1, "maxLength": 24}
PERSON = {"type": "object", "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 130},
                                           "city": NAME},
          "required": ["name", "age", "city"], "additionalProperties": False}
PRODUCT = {"type": "object", "properties": {"product": NAME, "price": {"type": "number", "minimum": 0},
                                            "tags": {"type": "array", "items": NAME, "minItems": 1, "maxItems": 3},
                                            "status": {"enum": ["in_stock", "sold_out"]}},
           "required": ["product", "price", "tags", "status"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": NAME, "unit": {"enum": ["celsius", "fahrenheit"]}},
                                                "required": ["city", "unit"], "additionalProperties": False}}}
SEARCH = {"type": "function", "function": {"name": "search_web", "description": "Search the web",
                                           "parameters": {"type": "object", "properties": {"query": NAME},
                                                          "required": ["query"], "additionalProperties": False}}}


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


def chat(question: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": question}], "max_tokens": 96, "temperature": 0, **extra}


BODIES = {
    "person": chat("Extract the person: Alice Johnson is a 34-year-old engineer who lives in Paris.",
                   response_format=schema_format(PERSON)),
    "person_free": chat("Extract the person as JSON: Bob Smith is a 52-year-old baker who lives in Denver."),
    "product": chat("Describe the product: the wireless mouse costs $24.99 and is sold out.",
                    response_format=schema_format(PRODUCT)),
    "json_object": chat("Give the capital of France as JSON.", response_format={"type": "json_object"}),
    "regex": chat("Give a date in ISO format.", structured_outputs={"regex": r"\d{4}-\d{2}-\d{2}"}),
    "choice": chat("Is the sun a star?", guided_choice=["yes", "no"]),
    "grammar": chat("Add two numbers.", structured_outputs={"grammar": 'root ::= [1-9] " + " [1-9]'}),
    "tool_required": chat("What's the weather like in Paris?", tools=[WEATHER, SEARCH], tool_choice="required"),
    "tool_named": chat("Find out who won the 2018 World Cup.", tools=[WEATHER, SEARCH], parallel_tool_calls=False,
                       tool_choice={"type": "function", "function": {"name": "search_web"}}),
    "tool_auto": chat("What's the weather like in Oslo?", tools=[WEATHER, SEARCH]),
    "bad_schema": chat("x", response_format=schema_format({"type": "array", "uniqueItems": True})),
}
SCHEMAS = {"person": PERSON, "product": PRODUCT, "json_object": {"type": "object"}}


def write(path: Path) -> Path:
    path.write_text("".join(json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                                        "body": body}) + "\n" for cid, body in BODIES.items()))
    return path


def run(tmp_path: Path, name: str, engine: EngineConfig = ENGINE, cluster: ClusterConfig | None = None,
        on_tick=None):
    out = tmp_path / f"{name}.jsonl"
    cluster = cluster or ClusterConfig()
    summary = run_batch(write(tmp_path / "in.jsonl"), out, engine, cluster, RouterConfig(max_prefill_tokens=512),
                        BatchOptions(progress=False), on_tick=on_tick)
    records = outputs(out)
    assert summary.succeeded == len(BODIES) - 1 and summary.failed == 1, summary.render()
    assert summary.kv_blocks_leaked == 0
    return summary, records


def tokens(records: dict) -> dict[str, list[int]]:
    return {cid: r["pdserve"]["output_token_ids"] for cid, r in records.items() if r["error"] is None}


@pytest.fixture(scope="module")
def pd(ray_cluster, tmp_path_factory):
    return run(tmp_path_factory.mktemp("pd"), "pd")


def test_constrained_answers_validate_and_tool_calls_are_read(pd):
    summary, records = pd
    msg = {cid: r["response"]["body"]["choices"][0] for cid, r in records.items() if r["error"] is None}
    for cid, schema in SCHEMAS.items():
        jsonschema.validate(json.loads(msg[cid]["message"]["content"]), schema)
        assert msg[cid]["finish_reason"] == "stop"
    assert len(msg["regex"]["message"]["content"]) == 10 and msg["choice"]["message"]["content"] in ("yes", "no")
    a, b = msg["grammar"]["message"]["content"].split(" + ")
    assert a in "123456789" and b in "123456789"
    for cid in ("tool_required", "tool_named"):
        assert msg[cid]["finish_reason"] == "tool_calls" and msg[cid]["message"]["content"] is None
        calls = msg[cid]["message"]["tool_calls"]
        assert calls and all(c["type"] == "function" for c in calls)
        tools = {t["function"]["name"]: t["function"]["parameters"] for t in BODIES[cid]["tools"]}
        for c in calls:
            jsonschema.validate(json.loads(c["function"]["arguments"]), tools[c["function"]["name"]])
    assert [c["function"]["name"] for c in msg["tool_named"]["message"]["tool_calls"]] == ["search_web"]
    # Every constrained line carries its check, and none failed (the summary counts them too).
    checked = {cid: r["pdserve"]["structured"] for cid, r in records.items() if "structured" in r["pdserve"]}
    assert set(checked) == {"person", "product", "json_object", "regex", "choice", "grammar", "tool_required",
                            "tool_named"}
    assert all(c["valid"] in (True, None) for c in checked.values()) and checked["grammar"]["valid"] is None
    assert summary.constrained == 8 and summary.validation_failures == 0
    bad = records["bad_schema"]["error"]
    assert bad["code"] == "unsupported_schema" and "uniqueItems" in bad["message"]


def test_colocated_gives_the_pd_answers(ray_cluster, tmp_path, pd):
    _, records = run(tmp_path, "colocated", replace(ENGINE, max_num_seqs=8),
                     ClusterConfig(mode="colocated", num_colocated=1, max_num_batched_tokens=32))
    assert tokens(records) == tokens(pd[1])


def test_speculative_decoding_gives_the_pd_answers(ray_cluster, tmp_path, pd):
    _, records = run(tmp_path, "ngram", replace(ENGINE, speculative="ngram", num_speculative_tokens=3))
    assert tokens(records) == tokens(pd[1])
    assert any((r["pdserve"].get("speculative") or {}).get("accepted", 0) > 0 for r in records.values())


def test_requests_retried_after_a_decode_worker_is_killed_give_the_pd_answers(ray_cluster, tmp_path, pd):
    kill = KillOnce("decode", lambda router: sum(r.state == State.DECODE for r in router.active.values()) >= 3)
    _, records = run(tmp_path, "killed", on_tick=kill)
    assert kill.done
    assert tokens(records) == tokens(pd[1])
    assert any(r["pdserve"]["attempts"] > 1 for r in records.values() if r["error"] is None)
