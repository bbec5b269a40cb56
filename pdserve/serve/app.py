"""The HTTP routes of `pdserve serve`: OpenAI's chat and completions (whole or streamed), models,
health, Prometheus metrics and the live dashboard.

A handler parses and admits its request, hands it to the router thread and
waits for that request's events. A client that goes away, or a request past
its deadline, is aborted in the router, which frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from pdserve.batch.format import BatchLimits
from pdserve.observability.dashboard.server import asset, page_html
from pdserve.openai.tool_stream import MessageStream
from pdserve.serve.loop import ServingLoop, Sink
from pdserve.serve.protocol import ApiError, Chunks, error_body, parse, response_body
from pdserve.serve.text import TextStream
from router.request import Request as RouterRequest
from router.request import State


@dataclass(frozen=True)
class AppConfig:
    model_name: str
    limits: BatchLimits
    api_key: str | None = None
    request_timeout_s: float = 600.0  # past it a request is aborted wherever it is


def build_app(config: AppConfig, loop: ServingLoop, tokenizer: Any) -> FastAPI:
    app = FastAPI(title="pdserve", docs_url=None, redoc_url=None, openapi_url=None)
    numbers = itertools.count(1)
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse(error_body(str(e.detail), "invalid_request_error", code), status_code=e.status_code)

    def check_key(request: Request) -> None:
        if config.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {config.api_key}".encode()):
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)", "invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    @app.get("/health")
    async def health() -> Response:
        if loop.error:
            return JSONResponse({"status": "error", "error": loop.error}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        check_key(request)
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": created,
                                             "owned_by": "pdserve", "max_model_len": config.limits.max_context}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await _complete("chat", request)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _complete("completion", request)

    async def _complete(kind: str, request: Request) -> Response:
        check_key(request)
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}", "invalid_json") from e
        # Tokenizing (and the chat template) takes a while for a long prompt: off the event loop.
        req, opts = await asyncio.to_thread(parse, kind, body, next(numbers), tokenizer, config.limits)
        loop.admission.admit(req)
        sink = Sink(asyncio.get_running_loop())
        loop.submit(req, sink)
        deadline = time.monotonic() + config.request_timeout_s
        if opts.stream:
            return StreamingResponse(_stream(req, sink, deadline, opts.include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-store"})
        return await _whole(req, sink, deadline, request)

    async def _next(req: RouterRequest, sink: Sink, deadline: float) -> tuple[str, Any]:
        """The request's next event; past its deadline, abort it and say so."""
        try:
            return await asyncio.wait_for(sink.events.get(), timeout=max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            loop.abort(req, f"deadline exceeded ({config.request_timeout_s:g}s)")
            return "timeout", f"the request did not finish within {config.request_timeout_s:g}s (--request-timeout)"

    async def _whole(req: RouterRequest, sink: Sink, deadline: float, request: Request) -> Response:
        waiter = asyncio.ensure_future(_until_done(req, sink, deadline))
        try:
            while not waiter.done():  # a client that hangs up is noticed within a second
                await asyncio.wait({waiter}, timeout=1.0)
                if not waiter.done() and await request.is_disconnected():
                    waiter.cancel()
                    loop.abort(req, "client disconnected")
                    return Response(status_code=499)
            kind, value = waiter.result()
        finally:
            waiter.cancel()
        if kind == "done" and value.state == State.DONE:
            return JSONResponse(response_body(value, tokenizer, config.model_name))
        raise _failure(kind, value)

    async def _until_done(req: RouterRequest, sink: Sink, deadline: float) -> tuple[str, Any]:
        while True:
            kind, value = await _next(req, sink, deadline)
            if kind != "tokens":
                return kind, value

    async def _stream(req: RouterRequest, sink: Sink, deadline: float, include_usage: bool) -> AsyncIterator[str]:
        chunks, text = Chunks(req, config.model_name), TextStream(req, tokenizer)
        message = MessageStream(parse_calls=req.tools is not None and req.tools.offered)  # chat: tool calls read out
        over = False
        try:
            if req.kind == "chat":
                yield _sse(chunks.delta(""))  # the role comes first, as OpenAI sends it
            while not over:
                kind, value = await _next(req, sink, deadline)
                if kind == "tokens":
                    delta = text.add(value)
                    for piece in _pieces(chunks, message, delta):
                        yield _sse(piece)
                    continue
                over = True
                if kind == "done" and value.state == State.DONE:
                    rest = text.finish(value)
                    if req.kind == "chat":
                        for piece in _pieces(chunks, message, rest, final=True):
                            yield _sse(piece)
                        called = message.calls and value.finish_reason == "stop"
                        yield _sse(chunks.chat_delta({}, "tool_calls" if called else value.finish_reason))
                    else:
                        yield _sse(chunks.delta(rest, value.finish_reason))
                    if include_usage:
                        yield _sse(chunks.usage(value))
                else:
                    yield _sse(_failure(kind, value).body())
                yield "data: [DONE]\n\n"
        finally:
            if not over:  # the client went away mid-stream (the server cancelled this generator)
                loop.abort(req, "client disconnected")

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(loop.collector.prometheus(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/dashboard")
    async def dashboard_redirect() -> Response:
        return RedirectResponse("/dashboard/")

    @app.get("/dashboard/")
    async def dashboard() -> Response:
        return Response(page_html(inline=False), media_type="text/html; charset=utf-8")

    @app.get("/dashboard/api/state")
    async def dashboard_state() -> Response:
        return JSONResponse(loop.collector.state())

    @app.get("/dashboard/static/{name}")
    async def dashboard_static(name: str) -> Response:
        found = asset(name)
        if found is None:
            raise HTTPException(404, f"no dashboard file {name!r}")
        return Response(found[0], media_type=found[1])

    return app


def _failure(kind: str, value: Any) -> ApiError:
    """A failed request (kind 'done'), one past its deadline ('timeout'), or a dead router ('error')."""
    if kind == "done":
        return ApiError(500, f"the request failed: {value.error}", "request_failed", "server_error")
    if kind == "timeout":
        return ApiError(504, str(value), "deadline_exceeded", "server_error")
    return ApiError(500, str(value), "internal_error", "server_error")


def _pieces(chunks: Chunks, message: MessageStream, delta: str, final: bool = False) -> list[dict]:
    """The chunks for new answer text: text as is for completions; chat deltas (content, tool calls) for chat."""
    if chunks.req.kind != "chat":
        return [chunks.delta(delta)] if delta else []
    deltas = message.add(delta) + (message.finish() if final else [])
    return [chunks.chat_delta(d) for d in deltas]


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
