"""The OpenAI bodies sent back: a whole completion, the chunks of a streamed one, usage, errors."""

from __future__ import annotations

import time
from typing import Any

from router.request import Request


def output_text(req: Request, tokenizer: Any) -> str:
    """The request's text: its output tokens decoded, cut before the first stop string."""
    text = tokenizer.decode(req.output_token_ids, skip_special_tokens=True)
    cuts = [text.find(s) for s in req.params.stop if s in text]
    return text[: min(cuts)] if cuts else text


def usage(req: Request) -> dict[str, Any]:
    """OpenAI's usage of a finished request, with the prompt tokens found in the prefix cache."""
    n_out = len(req.output_token_ids)
    return {"prompt_tokens": req.prompt_len, "completion_tokens": n_out, "total_tokens": req.prompt_len + n_out,
            "prompt_tokens_details": {"cached_tokens": req.cached_tokens}}


def id_prefix(kind: str) -> str:
    """How OpenAI's ids of a chat (`chatcmpl-...`) or a completion (`cmpl-...`) begin."""
    return "chatcmpl" if kind == "chat" else "cmpl"


def completion_body(req: Request, tokenizer: Any, model: str, response_id: str) -> dict[str, Any]:
    """The whole (non-streamed) answer to a finished request: chat.completion or text_completion."""
    text = output_text(req, tokenizer)
    created = int(req.timeline.finish or time.time())
    if req.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": req.finish_reason}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": req.finish_reason}
        obj = "text_completion"
    return {"id": response_id, "object": obj, "created": created, "model": model, "choices": [choice],
            "usage": usage(req)}


class Chunks:
    """The chunks of one streamed answer, in OpenAI's chunk format."""

    def __init__(self, req: Request, model: str) -> None:
        self.req, self.model, self.created = req, model, int(time.time())
        self.first = True

    def delta(self, text: str, finish_reason: str | None = None) -> dict[str, Any]:
        if self.req.kind == "chat":
            delta: dict[str, Any] = {"content": text}
            if self.first:
                delta = {"role": "assistant", **delta}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        self.first = False
        return self._chunk([choice])

    def usage(self, finished: Request) -> dict[str, Any]:
        """The last chunk. `finished`: the request as it finished (through a deployment, a copy)."""
        return {**self._chunk([]), "usage": usage(finished)}

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.req.kind == "chat" else "text_completion"
        return {"id": self.req.custom_id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices}


def error_body(message: str, type_: str = "invalid_request_error", code: str | None = None) -> dict[str, Any]:
    """OpenAI's error: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}
