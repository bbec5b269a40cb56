"""Per-request grammar matchers (llguidance), built from a Constraint against one tokenizer.

`GrammarCompiler` belongs to a worker: it wraps the model's tokenizer once (~0.3 s) and keeps one
compiled, untouched matcher per constraint; a request gets a copy of it (a few microseconds, where
building one costs ~1 ms). `Matcher` is the request's state: it fills its bitmask row, takes the
tokens the request keeps, and rolls back speculative drafts it tried.

EOS is in the mask only where the grammar may end (llguidance adds the tokenizer's EOS ids, given
here as the model's own, whenever the grammar accepts), so a constrained answer ends complete or at
max_tokens.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from engine.structured.spec import Constraint


class GrammarViolation(ValueError):
    """A token the grammar forbids reached a matcher: the mask was not applied where it should have been."""


def tokenizer_json(tokenizer: Any) -> str:
    """The tokenizer.json text of an HFTokenizer (engine/hf_tokenizer.py) or a transformers fast tokenizer."""
    backend = getattr(tokenizer, "backend", None) or getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        raise ValueError(f"structured outputs need a tokenizers-based tokenizer, got {type(tokenizer).__name__}")
    return backend.to_str()


class GrammarCompiler:
    """Compiled grammars for one tokenizer, cached per constraint (LRU, `max_cached` of them)."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int], max_cached: int = 256) -> None:
        import llguidance

        self._llg = llguidance
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(eos_token_ids)
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json(tokenizer), n_vocab=vocab_size,
                                                eos_token=list(eos_token_ids))
        self._cache: OrderedDict[Constraint, Any] = OrderedDict()
        self._max_cached = max_cached
        self._lock = threading.Lock()  # workers build matchers on Ray threads and the compute thread

    def matcher(self, constraint: Constraint) -> Matcher:
        """A fresh matcher at the start of `constraint`; ValueError when it cannot be built."""
        with self._lock:
            template = self._cache.get(constraint)
            if template is None:
                template = self._llg.LLMatcher(self.tokenizer, constraint.grammar(), log_level=0)
                if template.is_error():
                    raise ValueError(f"{constraint.kind.value} cannot be enforced: {template.get_error()}")
                self._cache[constraint] = template
                if len(self._cache) > self._max_cached:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(constraint)
            return Matcher(template.deep_copy(), self.eos_token_ids)

    def replay(self, constraint: Constraint, tokens: Sequence[int]) -> Matcher:
        """The matcher after `tokens` (a request's output so far): the state a worker that admits the
        request mid-answer needs, rebuilt exactly from what travels with it."""
        m = self.matcher(constraint)
        for t in tokens:
            m.accept(t)
        return m


class Matcher:
    def __init__(self, inner: Any, eos_token_ids: Sequence[int]) -> None:
        self._m = inner
        self._eos = frozenset(eos_token_ids)
        self.ended = False  # an EOS was accepted: the answer is complete

    def accept(self, token: int) -> None:
        """Take a token the request keeps; GrammarViolation if the grammar forbids it."""
        if not self._m.consume_token(token):
            raise GrammarViolation(f"token {token} violates the grammar: {self._m.get_error()}")
        self.ended = self.ended or token in self._eos

    def try_accept(self, token: int) -> bool:
        """Take a speculative token if the grammar allows it (undo with rollback); False leaves the state as it was."""
        return self._m.try_consume_tokens([token]) == 1

    def rollback(self, n: int) -> None:
        if n and not self._m.rollback(n):
            raise GrammarViolation(f"rollback of {n} tokens failed: {self._m.get_error()}")

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into bitmask[row] (int32, CPU, contiguous; bit t%32 of word t//32)."""
        v = bitmask[row]
        self.fill_at(v.data_ptr(), v.numel() * 4)

    def fill_at(self, address: int, nbytes: int) -> None:
        """fill() into `nbytes` of memory at `address` (one bitmask row the caller owns). llguidance computes
        it without holding the GIL."""
        self._m.unsafe_compute_mask_ptr(address, nbytes)

    def accepts_end(self) -> bool:
        """The tokens so far form a whole answer."""
        return self._m.is_accepting()

    @property
    def error(self) -> str | None:
        return self._m.get_error() if self._m.is_error() else None
