"""One finished request as an OpenAI batch output record, with pdserve's own facts beside it:

    {"id": "batch_req_...", "custom_id": "a", "response": {"status_code": 200, "request_id": "...", "body": {...}},
     "error": null, "pdserve": {"line": 1, "timeline": {...}, ...}}

A request that failed: `"response": null, "error": {"code", "message"}`. run-batch writes these lines; the
metrics (pdserve.observability) read them, from run-batch, the online server and a deployment's router.
"""

from __future__ import annotations

import uuid
from typing import Any

from pdserve.openai.responses import completion_body, id_prefix, output_text, usage
from pdserve.openai.structured import answer_check, constraint_kind
from router.request import Request, State


def success_record(req: Request, tokenizer: Any, model_name: str) -> dict[str, Any]:
    rid = f"{id_prefix(req.kind)}-{uuid.uuid4().hex[:24]}"
    body = completion_body(req, tokenizer, model_name, rid)
    return {"id": f"batch_req_{uuid.uuid4().hex[:24]}", "custom_id": req.custom_id,
            "response": {"status_code": 200, "request_id": rid, "body": body}, "error": None,
            "pdserve": {**extension(req), **structured_check(req, output_text(req, tokenizer))}}


def error_record(custom_id: str | None, line: int, code: str, message: str,
                 req: Request | None = None) -> dict[str, Any]:
    ext = extension(req) if req is not None else {"line": line}
    return {"id": f"batch_req_{uuid.uuid4().hex[:24]}", "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": message}, "pdserve": ext}


def metrics_record(req: Request, tokenizer: Any = None) -> dict[str, Any]:
    """What the metrics need of a finished request (no text): for a router that has no tokenizer, where a
    constrained answer is counted unchecked. Given one, it is decoded and checked (`structured_check`)."""
    ext = extension(req)
    if req.state == State.DONE:
        ext |= structured_check(req, output_text(req, tokenizer) if tokenizer is not None else None)
    if req.state != State.DONE:
        return {"custom_id": req.custom_id, "response": None,
                "error": {"code": "request_failed", "message": req.error}, "pdserve": ext}
    return {"custom_id": req.custom_id, "response": {"status_code": 200, "body": {"usage": usage(req)}},
            "error": None, "pdserve": ext}


def structured_check(req: Request, text: str | None) -> dict[str, Any]:
    """A constrained answer's kind and whether it validates (None: not checkable here, or no `text`: a
    router without a tokenizer still counts it), for the metrics."""
    constraint = req.params.constraint
    if constraint is None:
        return {}
    check = answer_check(text, constraint, req.tools) if text is not None else \
        {"kind": constraint_kind(constraint, req.tools), "valid": None}
    return {"structured": {**check, "finish_reason": req.finish_reason}}


def extension(req: Request) -> dict[str, Any]:
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
        "path": req.path,  # pd: prefilled on a prefill worker; chunked: on its decode-side worker
        "prefill_worker": req.prefill_worker,
        "decode_worker": req.decode_worker,
        "attempts": req.attempts + 1,
        "retried_after": list(req.errors),
        **({"slo": req.slo} if req.slo else {}),
        **({"speculative": req.speculative} if req.speculative else {}),
    }
