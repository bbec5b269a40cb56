"""The OpenAI batch format in and out (the format `vllm run-batch` also reads).

Input, one JSON object per line:
    {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "...", "messages": [...], "max_tokens": 64, "temperature": 0, ...}}
Output, one line per input line, in the order requests finish:
    {"id": "...", "custom_id": "a", "response": {"status_code": 200, "request_id": "...", "body": {...}},
     "error": null, "pdserve": {"line": 1, "timeline": {...}, ...}}
A line that cannot be served becomes `"response": null, "error": {"code", "message"}`; the batch goes on.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from engine.config import SamplingParams
from router.request import Request, State

URLS = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}
ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOP_STRINGS = 8


class LineError(ValueError):
    """What is wrong with one input line, in words a person can act on."""

    def __init__(self, message: str, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class BatchLimits:
    max_context: int  # the model's context length
    model_names: tuple[str, ...]  # accepted values of body.model (absent is accepted too)
    default_max_tokens: int = 512
    max_line_bytes: int = 8 << 20
    ignore_eos: bool = False  # --ignore-eos: for benchmarks


@dataclass(frozen=True)
class ParsedLine:
    line: int
    custom_id: str | None
    request: Request | None = None
    error: LineError | None = None


def iter_lines(stream: BinaryIO, max_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """(line number, raw bytes) for each non-empty line; None for a line longer than `max_bytes`.

    Reads at most `max_bytes` + 1 bytes of a line into memory, so a huge line costs no more.
    """
    number = 0
    while True:
        raw = stream.readline(max_bytes + 1)
        if not raw:
            return
        number += 1
        if len(raw) > max_bytes and not raw.endswith(b"\n"):
            while raw and not raw.endswith(b"\n"):  # skip the rest of the long line
                raw = stream.readline(1 << 20)
            yield number, None
            continue
        if raw.strip():
            yield number, raw


def parse_line(number: int, raw: bytes | None, tokenizer: Any, limits: BatchLimits,
               seen_ids: set[str]) -> ParsedLine:
    custom_id = None
    try:
        if raw is None:
            raise LineError(f"line is longer than {limits.max_line_bytes} bytes", "line_too_long")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise LineError(f"line is not valid UTF-8 (byte {e.start})", "invalid_encoding") from e
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise LineError(f"invalid JSON: {e.msg} at column {e.colno}", "invalid_json") from e
        if not isinstance(obj, dict):
            raise LineError(f"a line must be a JSON object, got {type(obj).__name__}")
        custom_id = obj.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            bad = custom_id
            custom_id = None
            raise LineError(f"custom_id must be a non-empty string, got {bad!r}")
        if custom_id in seen_ids:
            raise LineError(f"custom_id {custom_id!r} appears on an earlier line; each must be unique",
                            "duplicate_custom_id")
        seen_ids.add(custom_id)
        method = obj.get("method", "POST")
        if method != "POST":
            raise LineError(f"method must be POST, got {method!r}")
        url = obj.get("url")
        if url not in URLS:
            raise LineError(f"url must be one of {sorted(URLS)}, got {url!r}", "unsupported_url")
        body = obj.get("body")
        if not isinstance(body, dict):
            raise LineError("body must be a JSON object")
        request = build_request(number, custom_id, URLS[url], body, tokenizer, limits)
        return ParsedLine(number, custom_id, request=request)
    except LineError as e:
        return ParsedLine(number, custom_id, error=e)


def build_request(number: int, custom_id: str, kind: str, body: dict, tokenizer: Any,
                  limits: BatchLimits) -> Request:
    """A validated, tokenized Request from an OpenAI request body; raises LineError. The online
    server (pdserve.serve) calls it too, so both front ends accept and refuse exactly the same."""
    model = body.get("model")
    if model is not None and not _model_matches(model, limits.model_names):
        raise LineError(f"model {model!r} is not served here; this batch serves {limits.model_names[0]!r}",
                        "model_not_found")
    if body.get("n", 1) != 1:
        raise LineError("n must be 1: pdserve returns one choice per request")
    if kind == "chat":
        prompt_ids = _chat_prompt(body, tokenizer)
    else:
        prompt_ids = _completion_prompt(body, tokenizer)
    if len(prompt_ids) >= limits.max_context:
        raise LineError(f"prompt is {len(prompt_ids)} tokens; the model's context is {limits.max_context}",
                        "context_length_exceeded")
    room = limits.max_context - len(prompt_ids)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = min(limits.default_max_tokens, room)
    if not _is_int(max_tokens) or max_tokens <= 0:
        raise LineError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    if max_tokens > room:
        raise LineError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                        f"context of {limits.max_context}", "context_length_exceeded")
    temperature = _number(body, "temperature", 1.0)
    if temperature < 0:
        raise LineError(f"temperature must be >= 0, got {temperature}")
    top_p = _number(body, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise LineError(f"top_p must be in (0, 1], got {top_p}")
    top_k = body.get("top_k", 0)
    if not _is_int(top_k) or top_k < -1:
        raise LineError(f"top_k must be an integer >= -1, got {top_k!r}")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise LineError(f"seed must be an integer, got {seed!r}")
    stop = body.get("stop") or ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
        raise LineError("stop must be a non-empty string or a list of them")
    if len(stop) > MAX_STOP_STRINGS:
        raise LineError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}")
    priority = body.get("priority", 0)
    if not _is_int(priority):
        raise LineError(f"priority must be an integer, got {priority!r}")
    slo = body.get("slo")
    if slo is not None:
        if not isinstance(slo, dict) or not set(slo) <= {"ttft_s", "tpot_s"} or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in slo.values()):
            raise LineError('slo must be an object like {"ttft_s": 2.0, "tpot_s": 0.1} with positive seconds')
    ignore_eos = body.get("ignore_eos", limits.ignore_eos)
    if not isinstance(ignore_eos, bool):
        raise LineError(f"ignore_eos must be true or false, got {ignore_eos!r}")
    params = SamplingParams(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=max(top_k, 0),
        seed=seed if seed is not None else uuid.uuid4().int & ((1 << 63) - 1),
        stop=tuple(stop), ignore_eos=ignore_eos)
    return Request(request_id=f"r{number}", custom_id=custom_id, line=number, kind=kind,
                   prompt_token_ids=prompt_ids, params=params, priority=priority, slo=slo)


def _chat_prompt(body: dict, tokenizer: Any) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise LineError("messages must be a non-empty list")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise LineError(f"messages[{i}] must be an object with role and content")
        role = m.get("role")
        if role not in ROLES:
            raise LineError(f"messages[{i}].role must be one of {list(ROLES)}, got {role!r}")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise LineError(f"messages[{i}].content parts must all be text parts")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise LineError(f"messages[{i}].content must be a string, got {type(content).__name__}")
        clean.append({"role": "system" if role == "developer" else role, "content": content})
    return list(tokenizer.apply_chat_template(clean, add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"])


def _completion_prompt(body: dict, tokenizer: Any) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise LineError("prompt must not be empty")
        return list(tokenizer(prompt)["input_ids"])
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        if any(t < 0 or t >= len(tokenizer) for t in prompt):
            raise LineError(f"prompt token ids must be in [0, {len(tokenizer)})")
        return list(prompt)
    raise LineError("prompt must be a non-empty string or a list of token ids (one prompt per line)")


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
        raise LineError(f"{key} must be a number, got {x!r}")
    return float(x)


# ---- output -------------------------------------------------------------------------------
def output_text(req: Request, tokenizer: Any) -> str:
    text = tokenizer.decode(req.output_token_ids, skip_special_tokens=True)
    cuts = [text.find(s) for s in req.params.stop if s in text]
    return text[: min(cuts)] if cuts else text


def success_record(req: Request, tokenizer: Any, model_name: str) -> dict[str, Any]:
    text = output_text(req, tokenizer)
    created = int(req.timeline.finish or time.time())
    rid = f"{'chatcmpl' if req.kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    if req.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": req.finish_reason}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": req.finish_reason}
        obj = "text_completion"
    body = {"id": rid, "object": obj, "created": created, "model": model_name, "choices": [choice],
            "usage": usage(req)}
    return {"id": f"batch_req_{uuid.uuid4().hex[:24]}", "custom_id": req.custom_id,
            "response": {"status_code": 200, "request_id": rid, "body": body}, "error": None,
            "pdserve": _extension(req)}


def metrics_record(req: Request) -> dict[str, Any]:
    """What the metrics need of a finished request (no text): for a router that has no tokenizer."""
    ext = _extension(req)
    if req.state != State.DONE:
        return {"custom_id": req.custom_id, "response": None,
                "error": {"code": "request_failed", "message": req.error}, "pdserve": ext}
    return {"custom_id": req.custom_id, "response": {"status_code": 200, "body": {"usage": usage(req)}},
            "error": None, "pdserve": ext}


def usage(req: Request) -> dict[str, Any]:
    """OpenAI's usage of a finished request, with the prompt tokens found in the prefix cache."""
    n_out = len(req.output_token_ids)
    return {"prompt_tokens": req.prompt_len, "completion_tokens": n_out, "total_tokens": req.prompt_len + n_out,
            "prompt_tokens_details": {"cached_tokens": req.cached_tokens}}


def error_record(custom_id: str | None, line: int, code: str, message: str,
                 req: Request | None = None) -> dict[str, Any]:
    ext = _extension(req) if req is not None else {"line": line}
    return {"id": f"batch_req_{uuid.uuid4().hex[:24]}", "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": message}, "pdserve": ext}


def _extension(req: Request) -> dict[str, Any]:
    """Per-request facts for goodput and debugging: stage timestamps (unix s), tokens, placement."""
    first = req.token_times[0] if req.token_times else None
    return {
        "line": req.line,
        "timeline": req.timeline.as_dict(),
        "token_times_ms": [round((t - first) * 1000, 2) for t in req.token_times] if first else [],
        "output_token_ids": list(req.output_token_ids),
        "max_tokens": req.params.max_tokens,
        "kv_bytes": req.kv_bytes,
        "kv_blocks": req.kv_blocks,
        "cached_tokens": req.cached_tokens,  # prompt tokens taken from the prefill worker's prefix cache
        "kv_bytes_saved": req.kv_bytes_saved,  # prompt KV the decode worker already held: not transferred
        "kv_transfer_busy_s": round(req.kv_busy_s, 6),
        "kv_transfer_gbps": round(req.kv_bytes / req.kv_busy_s / 1e9, 3) if req.kv_busy_s > 0 else None,
        "transport": req.transport,
        "prefill_worker": req.prefill_worker,
        "decode_worker": req.decode_worker,
        "attempts": req.attempts + 1,
        "retried_after": list(req.errors),
        **({"slo": req.slo} if req.slo else {}),
        **({"speculative": req.speculative} if req.speculative else {}),
    }


def check_paths(input_path: Path, output_path: Path) -> None:
    """Fail before any work starts: missing input, or an output we could not write."""
    if not input_path.is_file():
        raise FileNotFoundError(f"input file {input_path} does not exist")
    parent = output_path.resolve().parent
    if not parent.is_dir():
        raise FileNotFoundError(f"output directory {parent} does not exist")
    if output_path.exists() and output_path.is_dir():
        raise IsADirectoryError(f"output path {output_path} is a directory")
    try:
        open(output_path, "a").close()  # creates it if missing; proves we may write there
    except OSError as e:
        raise PermissionError(f"cannot write output file {output_path}: {e.strerror}") from e
