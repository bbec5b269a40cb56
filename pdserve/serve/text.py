"""Token ids to streamed text that adds up to exactly the text run-batch writes.

The whole output is decoded again at each delta (outputs are short next to the
model step), and only a stable prefix is sent: a trailing U+FFFD (a multi-byte
character cut between tokens) and any tail that could still become a stop
string are held back. At the end the rest of `output_text` is sent, so the
concatenated deltas equal the non-streamed text.
"""

from __future__ import annotations

import logging
from typing import Any

from pdserve.openai.responses import output_text
from router.request import Request

log = logging.getLogger("pdserve.serve")


class TextStream:
    def __init__(self, req: Request, tokenizer: Any) -> None:
        self.req, self.tokenizer = req, tokenizer
        self.tokens: list[int] = []
        self.sent = ""

    def add(self, token_ids: list[int]) -> str:
        """New tokens -> the text that is safe to send now ('' if none)."""
        self.tokens += token_ids
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True).rstrip("\ufffd")
        stops = self.req.params.stop
        cuts = [text.find(s) for s in stops if s in text]
        if cuts:
            text = text[: min(cuts)]
        else:
            text = text[: len(text) - _held_back(text, stops)]
        return self._advance(text)

    def finish(self, req: Request) -> str:
        """The request is done: the rest of its final text."""
        return self._advance(output_text(req, self.tokenizer), final=True)

    def _advance(self, text: str, final: bool = False) -> str:
        if not text.startswith(self.sent):
            if final:  # cannot happen with a prefix-stable tokenizer; say so rather than send garbage
                log.warning("request %s: streamed text is not a prefix of its final text", self.req.request_id)
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best
