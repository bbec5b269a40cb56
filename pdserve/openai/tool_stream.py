"""An answer's text read into a chat message: content and tool calls, whole or as streamed deltas.

`MessageStream` takes the answer's text in pieces (as the server streams it) and returns OpenAI chat
deltas: content outside `<tool_call>` blocks as it comes, and each block, once it closes, as
tool-call deltas (the first with the call's id, type and name, the next with its arguments). The
whole message (`read_message`) is the same reader given the whole text at once, so streamed deltas
always add up to the non-streamed message:

    content      the text outside parsed call blocks, with the whitespace at both ends cut
                 (None when nothing is left); a block that does not parse stays in the content.
                 Without tools offered: the text as written
    tool_calls   [{"id", "type": "function", "function": {"name", "arguments": JSON text}}]

A tail that could still become `<tool_call>` (or whitespace that may yet end the content) is held
back until the next piece says what it is.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from pdserve.openai.tools import CALL_CLOSE, CALL_OPEN


@dataclass
class Message:
    content: str | None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    def openai(self) -> dict[str, Any]:
        msg: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            msg["tool_calls"] = self.tool_calls
        return msg


class MessageStream:
    """Text in, chat deltas out. One per answer; `parse_calls` False: every piece is content."""

    def __init__(self, parse_calls: bool = True) -> None:
        self.parse_calls = parse_calls
        self._buffer = ""  # text not yet turned into deltas
        self._inside = False  # within a <tool_call> block
        self._started = False  # content other than whitespace has been sent
        self._held_ws = ""  # whitespace sent only if more content follows
        self.calls: list[dict[str, Any]] = []

    def add(self, text: str) -> list[dict[str, Any]]:
        self._buffer += text
        return self._drain(final=False)

    def finish(self) -> list[dict[str, Any]]:
        return self._drain(final=True)

    def _drain(self, final: bool) -> list[dict[str, Any]]:
        deltas: list[dict[str, Any]] = []
        while True:
            if self._inside:
                end = self._buffer.find(CALL_CLOSE)
                if end < 0 and not final:
                    return deltas
                body = self._buffer if end < 0 else self._buffer[:end]
                self._buffer = "" if end < 0 else self._buffer[end + len(CALL_CLOSE):]
                self._inside = False
                calls = _parse_calls(body)
                if calls is None:  # not a call: the block is content as written
                    deltas += self._content(CALL_OPEN + body + ("" if end < 0 else CALL_CLOSE))
                else:
                    deltas += self._call_deltas(calls)
                continue
            start = self._buffer.find(CALL_OPEN) if self.parse_calls else -1
            if start >= 0:
                deltas += self._content(self._buffer[:start])
                self._buffer, self._inside = self._buffer[start + len(CALL_OPEN):], True
                continue
            keep = 0 if final or not self.parse_calls else _partial_tag(self._buffer)
            deltas += self._content(self._buffer[:len(self._buffer) - keep])
            self._buffer = self._buffer[len(self._buffer) - keep:]
            return deltas

    def _content(self, text: str) -> list[dict[str, Any]]:
        if not self.parse_calls:  # no tools offered: the text is the content, as written
            return [{"content": text}] if text else []
        if not self._started:
            text = text.lstrip()
        body = text.rstrip()
        if not body:
            self._held_ws += text
            return []
        out, self._held_ws = self._held_ws + body, text[len(body):]
        self._started = True
        return [{"content": out}]

    def _call_deltas(self, calls: list[tuple[str, str]]) -> list[dict[str, Any]]:
        deltas = []
        for name, arguments in calls:
            index, call_id = len(self.calls), f"call_{uuid.uuid4().hex[:24]}"
            self.calls.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}})
            deltas.append({"tool_calls": [{"index": index, "id": call_id, "type": "function",
                                           "function": {"name": name, "arguments": ""}}]})
            deltas.append({"tool_calls": [{"index": index, "function": {"arguments": arguments}}]})
        return deltas


def read_message(text: str, parse_calls: bool) -> Message:
    """The whole answer as one message (the stream's deltas, added up). Without tools the content is the
    text as written (possibly empty)."""
    stream = MessageStream(parse_calls)
    deltas = stream.add(text) + stream.finish()
    content = "".join(d["content"] for d in deltas if "content" in d)
    return Message(content or None if parse_calls else content, stream.calls)


def _parse_calls(body: str) -> list[tuple[str, str]] | None:
    """(name, arguments as JSON) of each call in a block's JSON: one call or a list of them; None if not calls."""
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        args = item.get("arguments", item.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                return None
        calls.append((item["name"], json.dumps(args, ensure_ascii=False)))
    return calls or None


def _partial_tag(text: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of <tool_call>."""
    for n in range(min(len(CALL_OPEN) - 1, len(text)), 0, -1):
        if text.endswith(CALL_OPEN[:n]):
            return n
    return 0
