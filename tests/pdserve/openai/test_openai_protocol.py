"""The OpenAI protocol both front ends share: request fields checked group by group, in a fixed order;
the bodies and records built from a finished request."""

from __future__ import annotations

import pytest

from engine.config import SamplingParams
from pdserve.openai.limits import ModelLimits
from pdserve.openai.records import metrics_record, success_record
from pdserve.openai.requests import InvalidRequest, StreamOptions, build_request, stream_options
from pdserve.openai.responses import Chunks, completion_body
from router.request import Request, State

LIMITS = ModelLimits(max_context=64, model_names=("SmolLM2-135M-Instruct",), default_max_tokens=8)


def _refusal(body: dict, tokenizer, kind: str = "completion") -> InvalidRequest:
    with pytest.raises(InvalidRequest) as e:
        build_request(1, "c", kind, body, tokenizer, LIMITS)
    return e.value


def test_the_first_problem_in_field_order_is_the_one_reported(tokenizer):
    """model, n, prompt, max_tokens, sampling, stop, priority/slo, ignore_eos: each refusal below also
    breaks every later group, and names its own."""
    later = {"temperature": -1, "stop": 5, "priority": "high", "ignore_eos": "yes"}
    assert _refusal({"model": "gpt-4", "n": 2, "prompt": "", **later}, tokenizer).code == "model_not_found"
    assert "n must be 1" in str(_refusal({"n": 2, "prompt": "", **later}, tokenizer))
    assert "prompt must not be empty" in str(_refusal({"prompt": "", **later}, tokenizer))
    assert _refusal({"prompt": "x " * 70, **later}, tokenizer).code == "context_length_exceeded"
    assert "temperature" in str(_refusal({"prompt": "x", **later}, tokenizer))
    assert "stop must be" in str(_refusal({"prompt": "x", **later, "temperature": 0}, tokenizer))
    assert "priority" in str(_refusal({"prompt": "x", "priority": "high", "ignore_eos": "yes"}, tokenizer))
    assert "ignore_eos" in str(_refusal({"prompt": "x", "ignore_eos": "yes"}, tokenizer))


def test_a_valid_body_becomes_a_request(tokenizer):
    req = build_request(3, "cmpl-1", "completion", {"prompt": "Hello", "stop": "!", "seed": 5, "top_k": -1,
                                                    "slo": {"ttft_s": 1.5}}, tokenizer, LIMITS)
    assert (req.request_id, req.custom_id, req.line, req.kind) == ("r3", "cmpl-1", 3, "completion")
    assert req.params == SamplingParams(max_tokens=8, seed=5, stop=("!",))
    assert req.slo == {"ttft_s": 1.5} and req.prompt_token_ids == list(tokenizer("Hello")["input_ids"])


def test_stream_options():
    assert stream_options({}) == StreamOptions(False, False)
    assert stream_options({"stream": True, "stream_options": {"include_usage": True}}) == StreamOptions(True, True)
    for bad in ({"stream": 1}, {"stream_options": {"include_usage": "yes"}}, {"stream_options": [1]}):
        with pytest.raises(InvalidRequest) as e:
            stream_options(bad)
        assert e.value.code is None  # OpenAI's null code, as the server answered before


def _finished(kind: str, tokenizer) -> Request:
    req = Request("r1", "chatcmpl-x", 1, kind, [1, 2, 3], SamplingParams(max_tokens=8))
    for state in (State.PREFILL, State.ADMITTING, State.DECODE, State.DONE):
        req.move(state)
    req.output_token_ids = list(tokenizer("Hi there")["input_ids"])
    req.finish_reason = "stop"
    req.timeline.finish = 1_700_000_000.5
    return req


def test_bodies_and_records_of_a_finished_request(tokenizer):
    chat = _finished("chat", tokenizer)
    body = completion_body(chat, tokenizer, "m", "chatcmpl-1")
    assert (body["id"], body["object"], body["created"], body["model"]) == ("chatcmpl-1", "chat.completion",
                                                                           1_700_000_000, "m")
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hi there"}
    record = success_record(chat, tokenizer, "m")
    assert record["response"]["body"]["id"] == record["response"]["request_id"]
    assert record["response"]["body"]["choices"] == body["choices"] and record["pdserve"]["line"] == 1
    assert metrics_record(chat)["response"]["body"]["usage"] == body["usage"] == {
        "prompt_tokens": 3, "completion_tokens": len(chat.output_token_ids),
        "total_tokens": 3 + len(chat.output_token_ids), "prompt_tokens_details": {"cached_tokens": 0}}
    chunks = Chunks(_finished("completion", tokenizer), "m")
    first, usage = chunks.delta("Hi"), chunks.usage(chat)
    assert first["object"] == usage["object"] == "text_completion" and first["choices"][0]["text"] == "Hi"
    assert usage["choices"] == [] and usage["usage"] == body["usage"]
