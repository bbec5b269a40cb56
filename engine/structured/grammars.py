"""A worker's matchers: `for_request(params, output)` gives a request's matcher at its current state.

The compiler is built on the first constrained request (wrapping the tokenizer takes ~0.3 s), so a
worker that never sees one pays nothing. The state is rebuilt from what travels with a request (its
constraint in SamplingParams and its output so far): a decode worker replays the prefill worker's
first token; a retried request, or one on a restarted worker, replays into a fresh matcher and gets
the same masks.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from engine.config import SamplingParams
from engine.structured.matcher import GrammarCompiler, Matcher


class Grammars:
    def __init__(self, tokenizer: Callable[[], Any], vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        """tokenizer: returns the model's tokenizer (called once, on first use)."""
        self._tokenizer, self.vocab_size, self.eos_token_ids = tokenizer, vocab_size, tuple(eos_token_ids)
        self._compiler: GrammarCompiler | None = None
        self._lock = threading.Lock()

    @property
    def compiler(self) -> GrammarCompiler:
        with self._lock:
            if self._compiler is None:
                self._compiler = GrammarCompiler(self._tokenizer(), self.vocab_size, self.eos_token_ids)
            return self._compiler

    def for_request(self, params: SamplingParams, output: Sequence[int] = ()) -> Matcher | None:
        """The request's matcher after `output`; None when it is unconstrained. Raises ValueError or
        GrammarViolation when the constraint cannot be built or the output breaks it."""
        if params.constraint is None:
            return None
        return self.compiler.replay(params.constraint, output)
