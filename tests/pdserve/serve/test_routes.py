"""Each route of the online server called alone, over the real serving loop and a scripted router (no
Ray, no HTTP server): answers, streams, refusals, deadlines and a dead router thread."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from engine.config import SamplingParams
from pdserve.batch.format import parse_line
from pdserve.observability.dashboard.collector import MetricsCollector
from pdserve.observability.metrics import SLO
from pdserve.openai.limits import ModelLimits
from pdserve.serve.admission import Admission, AdmissionConfig
from pdserve.serve.app import MonitoringRoutes, build_app
from pdserve.serve.errors import ApiError
from pdserve.serve.loop import ServingLoop
from pdserve.serve.routes import AppConfig, CompletionRoutes, parse_body
from proto.workers import WorkerSet
from router.request import Request as RouterRequest
from router.request import State

MODEL = "SmolLM2-135M-Instruct"
LIMITS = ModelLimits(max_context=8192, model_names=(MODEL,), default_max_tokens=16)
ANSWER = "Paris is the capital of France."


class ScriptedRouter:
    """The router's interface (router.api.RouterAPI) over no workers: every request is prefilled at its
    first tick and then gets one token of `answer` per tick (all of them when not streaming), unless `stall`."""

    def __init__(self, on_finished, on_tokens, answer: list[int], stall: bool = False, fail: bool = False) -> None:
        self.on_finished, self.on_tokens = on_finished, on_tokens
        self.answer, self.stall, self.fail = answer, stall, fail
        self.active: dict[str, RouterRequest] = {}
        self.workers = WorkerSet(prefill={}, decode={})
        self.aborted: list[tuple[str, str]] = []
        self.submitted: list[RouterRequest] = []

    def submit(self, req: RouterRequest) -> None:
        self.submitted.append(req)
        self.active[req.request_id] = req

    def abort(self, request_id: str, reason: str) -> bool:
        req = self.active.pop(request_id, None)
        if req is None:
            return False
        self.aborted.append((request_id, reason))
        req.fail(f"aborted: {reason}")
        self.on_finished(req)
        return True

    def tick(self, wait_s: float = 0.5) -> None:
        if self.fail:
            raise RuntimeError("scripted router bug")
        time.sleep(0.005)
        for req in list(self.active.values()):
            if self.stall:
                continue
            if req.state == State.QUEUED:
                for state in (State.PREFILL, State.ADMITTING, State.DECODE):
                    req.move(state)
            req.output_token_ids.append(self.answer[len(req.output_token_ids)])
            req.timeline.first_token = req.timeline.first_token or time.time()
            if len(req.output_token_ids) == len(self.answer):
                req.timeline.finish = time.time()
                req.finish_reason = "stop"
                req.move(State.DONE)
            new = req.output_token_ids[req.streamed:]
            req.streamed = len(req.output_token_ids)
            self.on_tokens(req, new)
            if req.state == State.DONE:
                del self.active[req.request_id]
                self.on_finished(req)

    @property
    def done(self) -> bool:
        return not self.active

    def snapshot(self) -> dict[str, Any]:
        return {"states": {}, "queue_depth": {}, "kv_blocks_held": {}}


class OfflineCollector(MetricsCollector):
    """The real collector, minus the live refresh (it asks the decode workers through Ray)."""

    def refresh(self, router: Any, every_s: float = 1.0) -> None:
        pass


def _loop(tokenizer, **script) -> ServingLoop:
    answer = tokenizer(ANSWER)["input_ids"]
    return ServingLoop(lambda on_finished, on_tokens: ScriptedRouter(on_finished, on_tokens, answer, **script),
                       Admission(AdmissionConfig(), SLO()), OfflineCollector(SLO()))


def _request(body: Any = b"", key: str | None = None):
    """A Starlette request as uvicorn hands it to a route: the body, then a client that stays connected."""
    from starlette.requests import Request

    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    messages = [{"type": "http.request", "body": raw, "more_body": False}]

    async def receive() -> dict:
        if messages:
            return messages.pop(0)
        await asyncio.Event().wait()  # connected for good
        return {}

    headers = [(b"authorization", f"Bearer {key}".encode())] if key else []
    return Request({"type": "http", "method": "POST", "path": "/", "headers": headers, "query_string": b""}, receive)


async def _sse(response) -> list[Any]:
    events = []
    async for part in response.body_iterator:
        assert part.startswith("data: ") and part.endswith("\n\n")
        data = part[len("data: "):-2]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


@pytest.fixture()
def routes(tokenizer):
    loop = _loop(tokenizer)
    yield CompletionRoutes(AppConfig(MODEL, LIMITS, api_key="k", request_timeout_s=30), loop, tokenizer)
    loop.stop()


def test_models_needs_the_key(routes):
    with pytest.raises(ApiError) as e:
        asyncio.run(routes.models(_request()))
    assert e.value.status == 401 and e.value.code == "invalid_api_key"
    listed = asyncio.run(routes.models(_request(key="k")))
    assert [m["id"] for m in listed["data"]] == [MODEL] and listed["data"][0]["max_model_len"] == 8192


def test_a_completion_answered_whole(routes):
    body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}
    response = asyncio.run(routes.completions(_request(body, key="k")))
    answer = json.loads(response.body)
    assert response.status_code == 200 and answer["object"] == "text_completion"
    assert answer["id"].startswith("cmpl-") and answer["choices"][0]["text"] == ANSWER
    assert answer["choices"][0]["finish_reason"] == "stop"
    n = len(routes.tokenizer(ANSWER)["input_ids"])
    assert answer["usage"]["completion_tokens"] == n
    assert answer["usage"]["prompt_tokens"] == len(routes.tokenizer("The capital of France is")["input_ids"])


def test_a_chat_streamed_adds_up_to_the_answer(routes):
    body = {"messages": [{"role": "user", "content": "Capital of France?"}], "stream": True,
            "stream_options": {"include_usage": True}}

    async def run() -> list[Any]:
        return await _sse(await routes.chat(_request(body, key="k")))

    events = asyncio.run(run())
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == ANSWER
    assert len(chunks) > 3, "the text flows as it is generated"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert {c["id"] for c in chunks} == {usage["id"]} and usage["id"].startswith("chatcmpl-")
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == len(routes.tokenizer(ANSWER)["input_ids"])


@pytest.mark.parametrize("body, status, code", [
    (b"{not json", 400, "invalid_json"),
    ([1, 2], 422, None),
    ({"prompt": "x", "n": 2}, 400, "invalid_request"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model_not_found"),
    ({"prompt": "x", "stream": "yes"}, 400, None),
])
def test_refusals_are_openai_errors(routes, body, status, code):
    with pytest.raises(ApiError) as e:
        asyncio.run(routes.completions(_request(body, key="k")))
    assert (e.value.status, e.value.code) == (status, code)
    assert e.value.body()["error"]["type"] == "invalid_request_error"
    assert routes.loop.router.done, "nothing refused reaches the router"


def test_both_front_ends_refuse_a_body_in_the_same_words(tokenizer):
    """run-batch's line parser and the server's body parser share the protocol: same message, same code."""
    for body in ({"prompt": "x", "temperature": -1}, {"prompt": "x", "max_tokens": 0}, {"prompt": ""},
                 {"prompt": "x", "stop": ["a"] * 9}, {"prompt": "x", "slo": {"ttft_s": -1}}):
        line = json.dumps({"custom_id": "a", "url": "/v1/completions", "body": body}).encode()
        refused = parse_line(1, line, tokenizer, LIMITS, set()).error
        with pytest.raises(ApiError) as e:
            parse_body("completion", body, 1, tokenizer, LIMITS)
        assert refused is not None and (e.value.message, e.value.code) == (str(refused), refused.code)


def test_a_request_past_its_deadline_is_aborted(tokenizer):
    loop = _loop(tokenizer, stall=True)
    try:
        routes = CompletionRoutes(AppConfig(MODEL, LIMITS, request_timeout_s=0.2), loop, tokenizer)
        with pytest.raises(ApiError) as e:
            asyncio.run(routes.completions(_request({"prompt": "x"})))
        assert e.value.status == 504 and e.value.code == "deadline_exceeded"
        deadline = time.time() + 10
        while not loop.router.aborted and time.time() < deadline:
            time.sleep(0.01)
        assert [reason for _, reason in loop.router.aborted] == ["deadline exceeded (0.2s)"]
        assert loop.router.done
    finally:
        loop.stop()


def test_a_dead_router_thread_fails_the_stream_and_health(tokenizer):
    loop = _loop(tokenizer, fail=True)
    try:
        routes = CompletionRoutes(AppConfig(MODEL, LIMITS), loop, tokenizer)

        async def run() -> list[Any]:
            return await _sse(await routes.completions(_request({"prompt": "x", "stream": True})))

        events = asyncio.run(run())
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "internal_error"
        assert "scripted router bug" in events[-2]["error"]["message"]
        health = asyncio.run(MonitoringRoutes(loop).health())
        assert health.status_code == 503 and json.loads(health.body)["status"] == "error"
    finally:
        loop.stop()


async def _asgi(app, method: str, path: str) -> tuple[int, Any]:
    """One request through the whole ASGI app, as uvicorn would send it: (status, JSON body)."""
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "root_path": "",
             "query_string": b"", "headers": [], "http_version": "1.1", "scheme": "http",
             "server": ("test", 80), "client": ("test", 1)}
    await app(scope, receive, send)
    return sent[0]["status"], json.loads(b"".join(m.get("body", b"") for m in sent[1:]) or b"null")


def test_the_app_serves_every_route_and_answers_errors_as_openai(tokenizer):
    loop = _loop(tokenizer)
    try:
        app = build_app(AppConfig(MODEL, LIMITS, api_key="k"), loop, tokenizer)
        assert asyncio.run(_asgi(app, "GET", "/health")) == (200, {"status": "ok"})
        status, body = asyncio.run(_asgi(app, "GET", "/v1/models"))
        assert status == 401 and body["error"]["code"] == "invalid_api_key"  # the route ran: it checks the key
        status, body = asyncio.run(_asgi(app, "GET", "/v1/embeddings"))
        assert status == 404 and body["error"]["code"] == "not_found"
        status, body = asyncio.run(_asgi(app, "GET", "/v1/completions"))
        assert status == 405 and body["error"]["code"] == "method_not_allowed"
        assert asyncio.run(_asgi(app, "GET", "/dashboard/api/state"))[0] == 200
        assert b"pdserve_" in asyncio.run(MonitoringRoutes(loop).metrics()).body
    finally:
        loop.stop()


def test_request_params_reach_the_router(routes):
    """The request handed to the router is the one the protocol built (stop strings, seed, priority)."""
    body = {"prompt": "Once", "max_tokens": 16, "stop": ["France"], "seed": 7, "priority": 3, "temperature": 0.5}
    response = asyncio.run(routes.completions(_request(body, key="k")))
    assert json.loads(response.body)["choices"][0]["text"] == ANSWER[: ANSWER.index("France")]
    (req,) = routes.loop.router.submitted
    assert req.params == SamplingParams(max_tokens=16, temperature=0.5, seed=7, stop=("France",))
    assert req.priority == 3 and req.kind == "completion" and req.custom_id.startswith("cmpl-")
    assert routes.loop.router.done
