"""The OpenAI bodies sent back: a whole completion, the chunks of a streamed one, usage, errors."""

from __future__ import annotations

import time
from typing import Any

from pdserve.openai.structured import assistant_message, chat_finish_reason
from pdserve.openai.tool_stream import MessageStream
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
        message = assistant_message(text, req.tools)  # tool calls read out of the text (pdserve/openai/tools.py)
        choice = {"index": 0, "message": message.openai(), "logprobs": None,
                  "finish_reason": chat_finish_reason(req.finish_reason, message)}
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
        # a chat answer's text is read for tool calls when tools were offered (pdserve/openai/tool_stream.py)
        self.message = MessageStream(parse_calls=req.tools is not None and req.tools.offered) \
            if req.kind == "chat" else None

    def text(self, new: str) -> list[dict[str, Any]]:
        """The chunks for new answer text: as is for a completion; content and tool-call deltas for a chat."""
        if self.message is None:
            return [self.delta(new)] if new else []
        return [self.chat_delta(d) for d in self.message.add(new)]

    def last(self, rest: str, finish_reason: str | None) -> list[dict[str, Any]]:
        """The chunks that end the answer: the rest of its text, then the finish reason ("tool_calls" when the
        model stopped after calling tools)."""
        if self.message is None or not self.message.parse_calls:  # no tools: the rest and the reason together
            return [self.delta(rest, finish_reason)]
        chunks = [self.chat_delta(d) for d in self.message.add(rest) + self.message.finish()]
        called = bool(self.message.calls) and finish_reason == "stop"
        return [*chunks, self.chat_delta({}, "tool_calls" if called else finish_reason)]

    def delta(self, text: str, finish_reason: str | None = None) -> dict[str, Any]:
        if self.req.kind == "chat":
            return self.chat_delta({"content": text}, finish_reason)
        self.first = False
        return self._chunk([{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}])

    def chat_delta(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        """A chat chunk: content and/or tool-call deltas (pdserve/openai/tool_stream.py)."""
        if self.first:
            delta = {"role": "assistant", **delta}
        self.first = False
        return self._chunk([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}])

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
