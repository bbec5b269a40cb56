"""Hybrid dispatch (`--mode hybrid`): each request takes the PD path or the chunked path, chosen by a rule.

The workers: prefill workers, and hybrid workers (decode_worker/hybrid.py) that decode every request
and also prefill short prompts in chunks inside their steps. This strategy is the two others composed:
`PDDispatch` sends the requests the rule gives to PD (prefill batch -> KV into blocks reserved on a
hybrid worker -> admit), `ColocatedDispatch` submits the others to a hybrid worker with their prompt.
Both draw from the router's one queue in its order; each takes only the requests of its own path
(`Dispatch.accepts`). The path is chosen once per attempt, when the request first reaches the head of
the queue (router/hybrid_rule.py), and written on the request (`Request.path`, in every output line).
"""

from __future__ import annotations

from typing import Any

from proto.kinds import PrefillPath
from proto.messages import DecodePoll
from router.calls import Call, CallKind, Role
from router.colocated import ColocatedDispatch
from router.hybrid_rule import HybridRule, HybridSignals
from router.pd import PDDispatch
from router.request import Request
from router.strategy import Dispatch, RouterServices


class HybridDispatch(Dispatch):
    kinds = PDDispatch.kinds | ColocatedDispatch.kinds

    def __init__(self, router: RouterServices) -> None:
        super().__init__(router)
        self.rule: HybridRule = router.config.hybrid_rule
        self.pd = PDDispatch(router, accepts=lambda req: self.path(req) == PrefillPath.PD)
        self.chunked = ColocatedDispatch(router, accepts=lambda req: self.path(req) == PrefillPath.CHUNKED)
        self._pd_tokens: dict[str, int] = {}  # attempt id -> uncached prompt tokens, until its prefill returns

    # ---- the choice ----------------------------------------------------------------------------
    def path(self, req: Request) -> PrefillPath:
        """This attempt's path: chosen the first time it is asked, then kept (a retry chooses again)."""
        if req.path is None:
            signals = self.signals(req)
            req.path = self.rule.choose(signals) if self._prefill_up() else PrefillPath.CHUNKED
            if req.path == PrefillPath.PD:
                self._pd_tokens[req.attempt_id] = signals.uncached_tokens
        return req.path

    def signals(self, req: Request) -> HybridSignals:
        r = self.router
        keys = r.routing.keys(req.prompt_token_ids)
        overlap = r.routing.decode_overlap(keys)
        block = r.routing.decode_index.block_size if r.routing.decode_index else 0
        caps = r.placement.workers.values()
        load = min((len(c.holds) / max(1, c.max_num_seqs) for c in caps), default=1.0)
        ttft = (req.slo or {}).get("ttft_s", self.rule.ttft_slo_s)
        return HybridSignals(req.prompt_len, max(overlap.values(), default=0) * block, self._queued_pd_tokens(),
                             load, ttft)

    def _queued_pd_tokens(self) -> int:
        """Tokens of PD-path attempts not yet prefilled; attempts that ended otherwise are forgotten here."""
        live = {a: t for a, t in self._pd_tokens.items() if self.router.current(a) is not None}
        self._pd_tokens = live
        return sum(live.values())

    def _prefill_up(self) -> bool:
        r = self.router
        return any(not r.is_down(w) for w in r.workers.prefill)

    # ---- the Dispatch interface: each call goes to the strategy that made it ----------------------
    def dispatch(self) -> None:
        self.pd.dispatch()
        self.chunked.dispatch()

    def on_reply(self, call: Call, value: Any) -> None:
        (self.chunked if call.kind in ColocatedDispatch.kinds else self.pd).on_reply(call, value)

    def settle(self, call: Call) -> None:
        if call.kind == CallKind.PREFILL:
            for req in call.requests:
                if req is not None:
                    self._pd_tokens.pop(req.attempt_id, None)
        self.pd.settle(call)

    def on_poll(self, worker_id: str, poll: DecodePoll) -> None:
        self.chunked.on_poll(worker_id, poll)  # first tokens of chunked prompts

    def abort(self, req: Request) -> None:
        (self.chunked if req.path == PrefillPath.CHUNKED else self.pd).abort(req)

    def worker_back(self, role: Role, worker_id: str) -> None:
        self.pd.worker_back(role, worker_id)

    def worker_retired(self, role: Role, worker_id: str) -> None:
        self.pd.worker_retired(role, worker_id)

    def can_serve(self) -> bool:
        return bool(self.router.workers.decode)  # with no prefill worker left, every prompt is chunked

    def describe_role(self, role: Role) -> str:
        return "hybrid" if role == Role.DECODE else role.value
