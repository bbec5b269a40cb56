"""An OpenAI request body -> a validated, tokenized router Request.

`build_request` runs one parser per group of fields, in a fixed order (the first problem found is the
one reported); a new group of fields (response_format, tools, ...) is one more parser called there.
Every problem raises InvalidRequest with a message a person can act on and a code for the machine.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from typing import Any

from engine.config import SamplingParams
from pdserve.openai.limits import ModelLimits
from router.request import Request

# The endpoints served, by path -> the Request.kind each one makes.
ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}
ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOP_STRINGS = 8


class InvalidRequest(ValueError):
    """What is wrong with one request, in words a person can act on; `code` for programs
    (None: OpenAI's null code)."""

    def __init__(self, message: str, code: str | None = "invalid_request") -> None:
        super().__init__(message)
        self.code = code


def build_request(number: int, custom_id: str, kind: str, body: dict, tokenizer: Any,
                  limits: ModelLimits) -> Request:
    """A validated, tokenized Request from the body of a chat (`kind` 'chat') or completion request;
    raises InvalidRequest. run-batch and the online server both call it, so both accept and refuse
    exactly the same bodies."""
    check_model(body, limits)
    check_one_choice(body)
    prompt_ids = prompt_token_ids(kind, body, tokenizer)
    max_tokens = output_budget(body, len(prompt_ids), limits)
    sampling = sampling_fields(body)
    stop = stop_strings(body)
    priority, slo = scheduling_fields(body)
    params = SamplingParams(max_tokens=max_tokens, **sampling, stop=stop, ignore_eos=ignore_eos(body, limits))
    return Request(request_id=f"r{number}", custom_id=custom_id, line=number, kind=kind,
                   prompt_token_ids=prompt_ids, params=params, priority=priority, slo=slo)


# ---- one parser per group of fields, in build_request's order --------------------------------
def check_model(body: dict, limits: ModelLimits) -> None:
    model = body.get("model")
    if model is not None and not _model_matches(model, limits.model_names):
        raise InvalidRequest(f"model {model!r} is not served here; this batch serves {limits.model_names[0]!r}",
                             "model_not_found")


def check_one_choice(body: dict) -> None:
    if body.get("n", 1) != 1:
        raise InvalidRequest("n must be 1: pdserve returns one choice per request")


def prompt_token_ids(kind: str, body: dict, tokenizer: Any) -> list[int]:
    """The prompt as the model reads it: chat messages through the chat template, or a completion prompt."""
    return _chat_prompt(body, tokenizer) if kind == "chat" else _completion_prompt(body, tokenizer)


def output_budget(body: dict, prompt_len: int, limits: ModelLimits) -> int:
    """max_tokens (or max_completion_tokens): what is asked, the default where nothing is; both checked
    against the room the prompt leaves in the model's context."""
    if prompt_len >= limits.max_context:
        raise InvalidRequest(f"prompt is {prompt_len} tokens; the model's context is {limits.max_context}",
                             "context_length_exceeded")
    room = limits.max_context - prompt_len
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = min(limits.default_max_tokens, room)
    if not _is_int(max_tokens) or max_tokens <= 0:
        raise InvalidRequest(f"max_tokens must be a positive integer, got {max_tokens!r}")
    if max_tokens > room:
        raise InvalidRequest(f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                             f"context of {limits.max_context}", "context_length_exceeded")
    return max_tokens


def sampling_fields(body: dict) -> dict[str, Any]:
    """temperature, top_p, top_k, seed as SamplingParams takes them (no seed: a random one, drawn here,
    so that a retried request samples the same text)."""
    temperature = _number(body, "temperature", 1.0)
    if temperature < 0:
        raise InvalidRequest(f"temperature must be >= 0, got {temperature}")
    top_p = _number(body, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise InvalidRequest(f"top_p must be in (0, 1], got {top_p}")
    top_k = body.get("top_k", 0)
    if not _is_int(top_k) or top_k < -1:
        raise InvalidRequest(f"top_k must be an integer >= -1, got {top_k!r}")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise InvalidRequest(f"seed must be an integer, got {seed!r}")
    return {"temperature": temperature, "top_p": top_p, "top_k": max(top_k, 0),
            "seed": seed if seed is not None else uuid.uuid4().int & ((1 << 63) - 1)}


def stop_strings(body: dict) -> tuple[str, ...]:
    stop = body.get("stop") or ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
        raise InvalidRequest("stop must be a non-empty string or a list of them")
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidRequest(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}")
    return tuple(stop)


def scheduling_fields(body: dict) -> tuple[int, dict[str, float] | None]:
    """pdserve's own fields: the request's priority and its SLO (seconds), if it sets its own."""
    priority = body.get("priority", 0)
    if not _is_int(priority):
        raise InvalidRequest(f"priority must be an integer, got {priority!r}")
    slo = body.get("slo")
    if slo is not None:
        if not isinstance(slo, dict) or not set(slo) <= {"ttft_s", "tpot_s"} or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in slo.values()):
            raise InvalidRequest('slo must be an object like {"ttft_s": 2.0, "tpot_s": 0.1} with positive seconds')
    return priority, slo


def ignore_eos(body: dict, limits: ModelLimits) -> bool:
    value = body.get("ignore_eos", limits.ignore_eos)
    if not isinstance(value, bool):
        raise InvalidRequest(f"ignore_eos must be true or false, got {value!r}")
    return value


# ---- streaming: the online server's own fields --------------------------------------------------
@dataclass(frozen=True)
class StreamOptions:
    stream: bool = False
    include_usage: bool = False


def stream_options(body: dict) -> StreamOptions:
    """`stream` and `stream_options`, which only the online server reads (a batch answers whole)."""
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidRequest(f"stream must be true or false, got {stream!r}", code=None)
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict) or not isinstance(opts.get("include_usage", False), bool):
        raise InvalidRequest('stream_options must be an object like {"include_usage": true}', code=None)
    return StreamOptions(stream, bool(opts.get("include_usage", False)))


# ---- prompts ----------------------------------------------------------------------------------
def _chat_prompt(body: dict, tokenizer: Any) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list")
    clean = [_message(i, m) for i, m in enumerate(messages)]
    return list(tokenizer.apply_chat_template(clean, add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"])


def _message(i: int, m: Any) -> dict[str, str]:
    """messages[i] as the chat template takes it: a role it knows and the content as one string."""
    if not isinstance(m, dict):
        raise InvalidRequest(f"messages[{i}] must be an object with role and content")
    role = m.get("role")
    if role not in ROLES:
        raise InvalidRequest(f"messages[{i}].role must be one of {list(ROLES)}, got {role!r}")
    content = m.get("content")
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise InvalidRequest(f"messages[{i}].content parts must all be text parts")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise InvalidRequest(f"messages[{i}].content must be a string, got {type(content).__name__}")
    return {"role": "system" if role == "developer" else role, "content": content}


def _completion_prompt(body: dict, tokenizer: Any) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidRequest("prompt must not be empty")
        return list(tokenizer(prompt)["input_ids"])
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        if any(t < 0 or t >= len(tokenizer) for t in prompt):
            raise InvalidRequest(f"prompt token ids must be in [0, {len(tokenizer)})")
        return list(prompt)
    raise InvalidRequest("prompt must be a non-empty string or a list of token ids (one prompt per line)")


def _model_matches(model: Any, names: tuple[str, ...]) -> bool:
    if not isinstance(model, str):
        return False
    return any(model == n or model.endswith("/" + n) for n in names)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _number(body: dict, key: str, default: float) -> float:
    x = body.get(key)
    if x is None:
        return default
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise InvalidRequest(f"{key} must be a number, got {x!r}")
    return float(x)
