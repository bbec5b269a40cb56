"""When a sequence stops: EOS, a stop token, a stop string, or max_tokens.

Stop strings are matched on the decoded text of the last few tokens only, so
the check costs the same at token 5 and token 5000. The router later cuts the
final text at the first stop string (OpenAI semantics: the stop is not returned).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from engine.config import SamplingParams
from proto.kinds import FinishReason


class StopChecker:
    def __init__(self, eos_token_ids: Sequence[int], tokenizer: Any | None) -> None:
        self.eos = frozenset(eos_token_ids)
        self.tokenizer = tokenizer

    def check(self, output: Sequence[int], params: SamplingParams) -> FinishReason | None:
        """STOP, LENGTH or None (not finished) for a sequence whose newest token is output[-1]."""
        last = output[-1]
        if (not params.ignore_eos and last in self.eos) or last in params.stop_token_ids:
            return FinishReason.STOP
        if params.stop and self.tokenizer is not None and self._hits_stop_string(output, params.stop):
            return FinishReason.STOP
        if len(output) >= params.max_tokens:
            return FinishReason.LENGTH
        return None

    def accept(self, seq: Any, token: int, now: float) -> bool:
        """Append a sampled token to a running sequence (any kind with output, token_times, params and
        finish_reason) and say whether it stopped there: every decode loop takes its tokens this way."""
        seq.output.append(token)
        seq.token_times.append(now)
        seq.finish_reason = self.check(seq.output, seq.params)
        return seq.finish_reason is not None

    def _hits_stop_string(self, output: Sequence[int], stops: Sequence[str]) -> bool:
        # A stop string of n characters spans at most n tokens; two more cover a token split across it.
        window = max(len(s) for s in stops) + 2
        # Checked at every token, so any match in the tail is a new one.
        tail = self.tokenizer.decode(list(output[-window:]), skip_special_tokens=False)
        return any(s in tail for s in stops)
