"""Parsing the OpenAI batch format: valid lines become requests, each malformed line a clear error."""

from __future__ import annotations

import io
import json

import pytest

from pdserve.batch.format import iter_lines, parse_line
from pdserve.openai.limits import ModelLimits
from pdserve.openai.responses import output_text

LIMITS = ModelLimits(max_context=8192, model_names=("SmolLM2-135M-Instruct",), default_max_tokens=64)


def line(body=None, **top):
    obj = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
           "body": body if body is not None else {"messages": [{"role": "user", "content": "hi"}]}}
    obj.update(top)
    return json.dumps(obj).encode()


def parse(raw, seen=None):
    return parse_line(1, raw, TOKENIZER, LIMITS, set() if seen is None else seen, max_line_bytes=4096)


@pytest.fixture(autouse=True)
def _tok(tokenizer):
    global TOKENIZER
    TOKENIZER = tokenizer


def test_chat_line_becomes_a_request():
    body = {"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 10, "temperature": 0.5, "top_p": 0.9, "seed": 3, "stop": "x"}
    p = parse(line(body))
    assert p.error is None
    r = p.request
    assert r.custom_id == "a" and r.kind == "chat" and r.params.max_tokens == 10
    assert r.params.seed == 3 and r.params.stop == ("x",) and r.params.top_p == 0.9
    expected = TOKENIZER.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                             tokenize=True, return_dict=True)["input_ids"]
    assert r.prompt_token_ids == list(expected)


def test_completion_line_and_defaults():
    p = parse(line({"prompt": "Once upon"}, url="/v1/completions"))
    assert p.error is None and p.request.kind == "completion"
    assert p.request.params.max_tokens == LIMITS.default_max_tokens and p.request.params.temperature == 1.0
    assert p.request.prompt_token_ids == TOKENIZER("Once upon")["input_ids"]


BAD = [
    (b"{not json", "invalid_json"),
    (b"[1, 2]", "must be a JSON object"),
    (line(custom_id=None), "custom_id"),
    (line(custom_id=7), "custom_id"),
    (line(url="/v1/embeddings"), "unsupported_url"),
    (line(method="GET"), "method"),
    (line(body="text"), "body must be"),
    (line({"messages": []}), "non-empty list"),
    (line({"messages": [{"role": "wizard", "content": "x"}]}), "role"),
    (line({"messages": [{"role": "user", "content": 5}]}), "content"),
    (line({"messages": [{"role": "user", "content": "x"}], "model": "gpt-4"}), "model_not_found"),
    (line({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}), "max_tokens"),
    (line({"messages": [{"role": "user", "content": "x"}], "max_tokens": "9"}), "max_tokens"),
    (line({"messages": [{"role": "user", "content": "x"}], "max_tokens": 9000}), "context_length_exceeded"),
    (line({"messages": [{"role": "user", "content": "x"}], "temperature": -1}), "temperature"),
    (line({"messages": [{"role": "user", "content": "x"}], "top_p": 0}), "top_p"),
    (line({"messages": [{"role": "user", "content": "x"}], "top_p": 1.5}), "top_p"),
    (line({"messages": [{"role": "user", "content": "x"}], "seed": "abc"}), "seed"),
    (line({"messages": [{"role": "user", "content": "x"}], "stop": [1]}), "stop"),
    (line({"messages": [{"role": "user", "content": "x"}], "n": 2}), "n must be 1"),
    (line({"prompt": ""}, url="/v1/completions"), "prompt"),
    (line({"prompt": "word " * 9000}, url="/v1/completions"), "context_length_exceeded"),
    (b'{"custom_id": "\xff\xfe"}', "invalid_encoding"),
    (None, "line_too_long"),
]


@pytest.mark.parametrize("raw,expect", BAD, ids=[str(i) for i in range(len(BAD))])
def test_malformed_lines_get_a_clear_error(raw, expect):
    p = parse(raw)
    assert p.request is None and p.error is not None
    assert expect in p.error.code or expect in str(p.error), f"{p.error.code}: {p.error}"


def test_duplicate_custom_id():
    seen: set[str] = set()
    assert parse(line(), seen).error is None
    dup = parse(line(), seen)
    assert dup.error.code == "duplicate_custom_id"


def test_huge_line_is_skipped_and_the_next_line_read():
    data = b'{"a": 1}\n' + b"x" * 10_000 + b"\n\n" + b'{"b": 2}\n'
    got = list(iter_lines(io.BytesIO(data), max_bytes=4096))
    assert got == [(1, b'{"a": 1}\n'), (2, None), (4, b'{"b": 2}\n')]


def test_output_text_cuts_at_the_first_stop_string(tokenizer):
    from engine.config import SamplingParams
    from router.request import Request

    ids = tokenizer("red, green, blue, yellow", add_special_tokens=False)["input_ids"]
    req = Request("r1", "c", 1, "chat", [1], SamplingParams(stop=("blue", "green")))
    req.output_token_ids = ids
    assert output_text(req, tokenizer) == "red, "
