"""The OpenAI wire format of the online server: request checks, response bodies, stream chunks, errors.

Request bodies are validated and tokenized by the batch front end's
`build_request`, so a body run-batch refuses is refused here with the same
message. Only what is particular to HTTP is checked here (stream options).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from pdserve.batch.format import BatchLimits, LineError, build_request, success_record, usage
from router.request import Request

# LineError codes that are not a 400.
_STATUS = {"model_not_found": 404}


class ApiError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.type, self.headers = status, message, code, type_, headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.code)


def error_body(message: str, type_: str = "invalid_request_error", code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


@dataclass(frozen=True)
class StreamOptions:
    stream: bool = False
    include_usage: bool = False


def parse(kind: str, body: Any, number: int, tokenizer: Any, limits: BatchLimits) -> tuple[Request, StreamOptions]:
    """A Request from the body of POST /v1/chat/completions (kind 'chat') or /v1/completions."""
    if not isinstance(body, dict):
        raise ApiError(422, f"the request body must be a JSON object, got {type(body).__name__}")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, f"stream must be true or false, got {stream!r}")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict) or not isinstance(opts.get("include_usage", False), bool):
        raise ApiError(400, 'stream_options must be an object like {"include_usage": true}')
    prefix = "chatcmpl" if kind == "chat" else "cmpl"
    try:
        req = build_request(number, f"{prefix}-{uuid.uuid4().hex[:24]}", kind, body, tokenizer, limits)
    except LineError as e:
        raise ApiError(_STATUS.get(e.code, 400), str(e), e.code) from e
    return req, StreamOptions(stream, bool(opts.get("include_usage", False)))


def response_body(req: Request, tokenizer: Any, model: str) -> dict[str, Any]:
    """The non-streamed answer: the same body run-batch writes for the request, under its own id."""
    body = success_record(req, tokenizer, model)["response"]["body"]
    body["id"] = req.custom_id
    return body


class Chunks:
    """The chunks of one streamed answer, in OpenAI's chunk format."""

    def __init__(self, req: Request, model: str) -> None:
        self.req, self.model, self.created = req, model, int(time.time())
        self.first = True

    def delta(self, text: str, finish_reason: str | None = None) -> dict[str, Any]:
        if self.req.kind == "chat":
            return self.chat_delta({"content": text}, finish_reason)
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        self.first = False
        return {"id": self.req.custom_id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [choice]}

    def chat_delta(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        """A chat chunk: content and/or tool-call deltas (pdserve/openai/tool_stream.py)."""
        if self.first:
            delta = {"role": "assistant", **delta}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        self.first = False
        return {"id": self.req.custom_id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model, "choices": [choice]}

    def usage(self, finished: Request) -> dict[str, Any]:
        """The last chunk. `finished`: the request as it finished (through a deployment, a copy)."""
        obj = "chat.completion.chunk" if self.req.kind == "chat" else "text_completion"
        return {"id": self.req.custom_id, "object": obj, "created": self.created, "model": self.model,
                "choices": [], "usage": usage(finished)}
