"""Structured outputs and tools in request bodies (no model run): what is read, what is refused and how,
the prompt the tools make, tool calls read out of answers, and streamed deltas that add up."""

from __future__ import annotations

import json
import random

import pytest

from engine.structured.spec import ConstraintKind
from pdserve.batch.format import parse_line
from pdserve.openai.limits import ModelLimits
from pdserve.openai.records import metrics_record, success_record
from pdserve.openai.requests import InvalidRequest, build_request
from pdserve.openai.responses import Chunks, completion_body
from pdserve.openai.structured import answer_check, read_structured
from pdserve.openai.tool_stream import MessageStream, read_message
from pdserve.openai.tools import ToolChoice, chat_messages, read_tools
from router.request import State

LIMITS = ModelLimits(max_context=8192, model_names=("SmolLM2-135M-Instruct",))
MESSAGES = [{"role": "user", "content": "What's the weather in Paris?"}]
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
                                                "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}}


def body(**extra) -> dict:
    return {"messages": MESSAGES, "max_tokens": 32, **extra}


@pytest.mark.parametrize("extra,kind", [
    ({"response_format": {"type": "json_object"}}, ConstraintKind.JSON_OBJECT),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON, "strict": True}}},
     ConstraintKind.JSON_SCHEMA),
    ({"structured_outputs": {"json": PERSON}}, ConstraintKind.JSON_SCHEMA),
    ({"structured_outputs": {"regex": r"\d+"}}, ConstraintKind.REGEX),
    ({"structured_outputs": {"choice": ["a", "b"]}}, ConstraintKind.CHOICE),
    ({"structured_outputs": {"grammar": 'root ::= "x"'}}, ConstraintKind.GRAMMAR),
    ({"guided_json": json.dumps(PERSON)}, ConstraintKind.JSON_SCHEMA),
    ({"guided_regex": "[a-z]+"}, ConstraintKind.REGEX),
    ({"guided_choice": ["yes", "no"]}, ConstraintKind.CHOICE),
    ({"guided_grammar": 'start: "a"+'}, ConstraintKind.GRAMMAR),
])
def test_each_way_of_asking_gives_its_constraint(tokenizer, extra, kind):
    req = build_request(1, "c", "chat", body(**extra), tokenizer, LIMITS)
    assert req.params.constraint.kind == kind
    assert build_request(2, "c", "chat", body(response_format={"type": "text"}), tokenizer, LIMITS).params.constraint \
        is None


@pytest.mark.parametrize("extra,code,words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {
        "type": "array", "uniqueItems": True}}}}, "unsupported_schema", "uniqueItems"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {
        "type": "object", "properties": {"n": {"type": "integer", "not": {"const": 3}}}}}}}, "unsupported_schema",
     '"not"'),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "objekt"}}}},
     "invalid_response_format", "type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {
        "properties": {"a": {"maxLength": -1}}}}}}, "invalid_response_format", "properties/a/maxLength"),
    ({"response_format": {"type": "xml"}}, "invalid_response_format", "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "invalid_response_format", "json_schema"),
    ({"structured_outputs": {"regex": "a(b"}}, "invalid_response_format", "unclosed group"),
    ({"structured_outputs": {"choice": "yes"}}, "invalid_response_format", "list of strings"),
    ({"structured_outputs": {"sql": "x"}}, "invalid_response_format", "unknown structured output 'sql'"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "invalid_response_format", "give one"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
     "invalid_tools", "tool_choice required"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "invalid_tools", "'nope'"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "array", "uniqueItems": True}}}}}], "tool_choice": "required"}, "unsupported_schema",
     "uniqueItems"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "strang"}}}}}]}, "invalid_tools", "tools\\[0\\].function.parameters"),
    ({"tools": [WEATHER, WEATHER]}, "invalid_tools", "unique"),
    ({"tool_choice": "required"}, "invalid_tools", "needs tools"),
])
def test_bad_requests_are_refused_naming_what_is_wrong(tokenizer, extra, code, words):
    with pytest.raises(InvalidRequest, match=words) as e:
        build_request(1, "c", "chat", body(**extra), tokenizer, LIMITS)
    assert e.value.code == code


def test_a_bad_schema_in_a_batch_line_is_an_error_record(tokenizer):
    line = json.dumps({"custom_id": "x", "method": "POST", "url": "/v1/chat/completions", "body": body(
        response_format={"type": "json_schema", "json_schema": {"schema": {"type": "object", "if": {}}}})})
    parsed = parse_line(3, line.encode(), tokenizer, LIMITS, set())
    assert parsed.request is None and parsed.error.code == "unsupported_schema" and "if" in str(parsed.error)


def test_tools_in_the_prompt_and_the_constraint_of_each_choice(tokenizer):
    plain = build_request(1, "c", "chat", body(), tokenizer, LIMITS)
    auto = build_request(2, "c", "chat", body(tools=[WEATHER, TIME]), tokenizer, LIMITS)
    text = tokenizer.decode(auto.prompt_token_ids)
    assert "get_weather" in text and "<tool_call>" in text and "<tools>" in text
    assert auto.tools.choice == ToolChoice.AUTO and auto.params.constraint is None
    none = build_request(3, "c", "chat", body(tools=[WEATHER], tool_choice="none"), tokenizer, LIMITS)
    assert none.prompt_token_ids == plain.prompt_token_ids and none.params.constraint is None
    required = build_request(4, "c", "chat", body(tools=[WEATHER, TIME], tool_choice="required"), tokenizer, LIMITS)
    named = build_request(5, "c", "chat", body(tools=[WEATHER, TIME], parallel_tool_calls=False,
                                               tool_choice={"type": "function", "function": {"name": "get_time"}}),
                          tokenizer, LIMITS)
    for req in (required, named):
        assert req.params.constraint.kind == ConstraintKind.GRAMMAR
    assert "get_weather" in required.params.constraint.text and "get_weather" not in named.params.constraint.text
    # A user's system message keeps its words, the tools follow them.
    sys_msg = [{"role": "system", "content": "Be brief."}, *MESSAGES]
    with_sys = build_request(6, "c", "chat", {"messages": sys_msg, "tools": [WEATHER]}, tokenizer, LIMITS)
    assert tokenizer.decode(with_sys.prompt_token_ids).count("<|im_start|>system") == 1
    assert "Be brief.\n\nYou are a function calling" in tokenizer.decode(with_sys.prompt_token_ids)


def test_earlier_calls_and_results_are_rendered_as_text(tokenizer):
    history = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'}]
    req = build_request(1, "c", "chat", {"messages": history, "tools": [WEATHER]}, tokenizer, LIMITS)
    text = tokenizer.decode(req.prompt_token_ids)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert '<|im_start|>tool\n<tool_response>\n{"temp": 21}\n</tool_response>' in text
    with pytest.raises(InvalidRequest, match="not JSON"):
        bad = [{**history[1], "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}]
        build_request(1, "c", "chat", {"messages": [*MESSAGES, *bad]}, tokenizer, LIMITS)


CALLS = [("get_weather", {"city": "Paris", "unit": "C"}), ("get_time", {"zone": "Europe/Paris"})]


def test_tool_calls_round_trip_through_the_history_and_the_parser():
    """Calls rendered as an earlier assistant turn (the prompt's format) read back as the same calls."""
    msg = {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"id": f"c{i}", "type": "function", "function": {"name": n, "arguments": json.dumps(a)}}
        for i, (n, a) in enumerate(CALLS)]}
    text = chat_messages([msg], None, native_tools=True)[0]["content"]
    parsed = read_message(text, parse_calls=True)
    assert parsed.content == "Checking."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed.tool_calls] == CALLS
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in parsed.tool_calls)
    # SmolLM2's own format: one block holding a list of calls.
    listed = "<tool_call>" + json.dumps([{"name": n, "arguments": a} for n, a in CALLS]) + "</tool_call>"
    assert [c["function"]["name"] for c in read_message(listed, True).tool_calls] == ["get_weather", "get_time"]
    # A block that is not a call stays in the content, as written; without tools nothing is parsed.
    assert read_message("a <tool_call>not json</tool_call>", True).content == "a <tool_call>not json</tool_call>"
    assert read_message(text, parse_calls=False).content == text and not read_message(text, False).tool_calls


def add_up(deltas: list[dict]) -> tuple[str | None, list[tuple[str, str]]]:
    """What a client makes of streamed chat deltas (the openai SDK's accumulation)."""
    content, calls = "", {}
    for d in deltas:
        content += d.get("content") or ""
        for tc in d.get("tool_calls") or []:
            entry = calls.setdefault(tc["index"], {"name": "", "arguments": ""})
            entry["name"] += (tc.get("function") or {}).get("name") or ""
            entry["arguments"] += (tc.get("function") or {}).get("arguments") or ""
    return content or None, [(c["name"], c["arguments"]) for _, c in sorted(calls.items())]


@pytest.mark.parametrize("seed", range(6))
def test_streamed_deltas_add_up_to_the_whole_message(seed):
    rng = random.Random(seed)
    blocks = [f'<tool_call>\n{json.dumps({"name": n, "arguments": a})}\n</tool_call>' for n, a in CALLS]
    text = rng.choice(["", "  Let me look.\n", "Sure"]) + "\n".join(blocks) + rng.choice(["", "\n", " done <tool"])
    whole = read_message(text, True)
    stream = MessageStream()
    deltas, i = [], 0
    while i < len(text):  # random cuts, tags split across pieces included
        j = i + rng.randint(1, 7)
        deltas += stream.add(text[i:j])
        i = j
    deltas += stream.finish()
    content, calls = add_up(deltas)
    assert content == whole.content
    assert calls == [(c["function"]["name"], c["function"]["arguments"]) for c in whole.tool_calls]
    assert len(calls) == 2


def test_answers_are_checked_for_the_metrics():
    constraint, tools = read_structured(body(tools=[WEATHER], tool_choice="required"), "chat")
    good = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    assert answer_check(good, constraint, tools) == {"kind": "tool_calls", "valid": True}
    assert answer_check(good.replace("city", "town"), constraint, tools)["valid"] is False
    schema, _ = read_structured({"response_format": {"type": "json_schema", "json_schema": {"schema": PERSON}}},
                                "completion")
    assert answer_check('{"name": "A", "age": 3}', schema) == {"kind": "json_schema", "valid": True}
    assert answer_check('{"name": "A"}', schema)["valid"] is False
    choice, _ = read_structured({"guided_choice": ["x", "y"]}, "completion")
    assert answer_check("y", choice)["valid"] and not answer_check("z", choice)["valid"]


def test_success_record_carries_tool_calls_and_the_check(tokenizer):
    req = build_request(1, "c", "chat", body(tools=[WEATHER], tool_choice="required"), tokenizer, LIMITS)
    answer = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    req.output_token_ids = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]
    req.finish_reason, req.state = "stop", State.DONE
    rec = success_record(req, tokenizer, "m")
    choice = rec["response"]["body"]["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert choice["message"]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    assert rec["pdserve"]["structured"] == {"kind": "tool_calls", "valid": True, "finish_reason": "stop"}


def test_read_tools_defaults():
    plan = read_tools({"tools": [WEATHER]})
    assert plan.choice == ToolChoice.AUTO and plan.parallel and plan.offered and plan.constraint() is None
    assert read_tools({"tools": []}) is None and read_tools({}) is None
    # Under auto nothing is enforced: a keyword the engine lacks is no reason to refuse the tools.
    lax = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "dependentRequired": {}}}}
    assert read_tools({"tools": [lax]}).choice == ToolChoice.AUTO


def test_streamed_chunks_of_a_tool_call_add_up_to_the_whole_body(tokenizer):
    """Chunks (what `pdserve serve` streams) against completion_body (what it answers whole) for one answer."""
    req = build_request(1, "c", "chat", body(tools=[WEATHER]), tokenizer, LIMITS)
    answer = 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    req.output_token_ids = tokenizer.encode(answer, add_special_tokens=False)
    req.finish_reason, req.state = "stop", State.DONE
    chunks = Chunks(req, "m")
    pieces = [chunks.delta(""), *chunks.text(answer[:20]), *chunks.text(answer[20:45])]  # a tag split in two
    pieces += chunks.last(answer[45:], "stop")
    assert pieces[0]["choices"][0]["delta"]["role"] == "assistant"
    content, calls = add_up([p["choices"][0]["delta"] for p in pieces])
    whole = completion_body(req, tokenizer, "m", "id")["choices"][0]
    assert content == whole["message"]["content"] == "Checking."
    assert calls == [(c["function"]["name"], c["function"]["arguments"]) for c in whole["message"]["tool_calls"]]
    assert pieces[-1]["choices"][0]["finish_reason"] == whole["finish_reason"] == "tool_calls"
    assert all(p["choices"][0]["finish_reason"] is None for p in pieces[:-1])


def test_a_router_without_a_tokenizer_counts_constrained_answers_unchecked(tokenizer):
    """A deployment's router has no tokenizer: its metrics still count the constrained answer, valid unknown."""
    req = build_request(1, "c", "chat", body(tools=[WEATHER], tool_choice="required"), tokenizer, LIMITS)
    answer = '<tool_call>\n{"name": "get_weather", "arguments": {"town": "Oslo"}}\n</tool_call>'
    req.output_token_ids = tokenizer.encode(answer, add_special_tokens=False)
    req.finish_reason, req.state = "stop", State.DONE
    unchecked = metrics_record(req)["pdserve"]["structured"]
    assert unchecked == {"kind": "tool_calls", "valid": None, "finish_reason": "stop"}
    checked = metrics_record(req, tokenizer)["pdserve"]["structured"]
    assert checked == {"kind": "tool_calls", "valid": False, "finish_reason": "stop"}  # "town" is not a parameter
    free = build_request(2, "f", "chat", body(), tokenizer, LIMITS)
    free.state = State.DONE
    assert "structured" not in metrics_record(free)["pdserve"]
