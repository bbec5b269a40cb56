"""The OpenAI routes of `pdserve serve`: chat and completions (whole or streamed) and the model list.

A handler parses and admits its request, hands it to the serving loop (the router's thread) and follows
its events (`InFlight`). A client that goes away, or a request past its deadline, is aborted in the
router, which frees its KV blocks. Each route is a method of `CompletionRoutes`, which holds the serving
loop, the tokenizer and the configuration, so that a test can call one route alone.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from pdserve.openai.limits import ModelLimits
from pdserve.openai.requests import InvalidRequest, StreamOptions, build_request, stream_options
from pdserve.openai.responses import Chunks, completion_body, id_prefix
from pdserve.serve.errors import ApiError, failure
from pdserve.serve.events import Finished, Tokens
from pdserve.serve.loop import InFlight, ServingLoop
from pdserve.serve.text import TextStream
from router.request import Request as RouterRequest


@dataclass(frozen=True)
class AppConfig:
    model_name: str
    limits: ModelLimits
    api_key: str | None = None
    request_timeout_s: float = 600.0  # past it a request is aborted wherever it is


def parse_body(kind: str, body: Any, number: int, tokenizer: Any,
               limits: ModelLimits) -> tuple[RouterRequest, StreamOptions]:
    """A Request from the JSON body of POST /v1/chat/completions (kind 'chat') or /v1/completions, and how
    to answer it; the protocol's refusals as ApiErrors."""
    if not isinstance(body, dict):
        raise ApiError(422, f"the request body must be a JSON object, got {type(body).__name__}")
    try:
        options = stream_options(body)
        req = build_request(number, f"{id_prefix(kind)}-{uuid.uuid4().hex[:24]}", kind, body, tokenizer, limits)
    except InvalidRequest as e:
        raise ApiError.invalid(e) from e
    return req, options


class CompletionRoutes:
    def __init__(self, config: AppConfig, loop: ServingLoop, tokenizer: Any) -> None:
        self.config, self.loop, self.tokenizer = config, loop, tokenizer
        self._numbers = itertools.count(1)
        self._created = int(time.time())

    def router(self) -> APIRouter:
        routes = APIRouter()
        routes.add_api_route("/v1/models", self.models, methods=["GET"])
        routes.add_api_route("/v1/chat/completions", self.chat, methods=["POST"])
        routes.add_api_route("/v1/completions", self.completions, methods=["POST"])
        return routes

    async def models(self, request: Request) -> dict:
        self.check_key(request)
        return {"object": "list", "data": [{"id": self.config.model_name, "object": "model", "created": self._created,
                                             "owned_by": "pdserve", "max_model_len": self.config.limits.max_context}]}

    async def chat(self, request: Request) -> Response:
        return await self.complete("chat", request)

    async def completions(self, request: Request) -> Response:
        return await self.complete("completion", request)

    def check_key(self, request: Request) -> None:
        if self.config.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {self.config.api_key}".encode()):
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)", "invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    async def complete(self, kind: str, request: Request) -> Response:
        self.check_key(request)
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}", "invalid_json") from e
        # Tokenizing (and the chat template) takes a while for a long prompt: off the event loop.
        req, options = await asyncio.to_thread(parse_body, kind, body, next(self._numbers), self.tokenizer,
                                               self.config.limits)
        self.loop.admission.admit(req)
        flight = InFlight(self.loop, req, self.config.request_timeout_s)
        if options.stream:
            return StreamingResponse(self.stream(flight, options.include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-store"})
        return await self.whole(flight, request)

    async def whole(self, flight: InFlight, request: Request) -> Response:
        """The answer in one body, once the request has finished."""
        waiter = asyncio.ensure_future(flight.outcome())
        try:
            while not waiter.done():  # a client that hangs up is noticed within a second
                await asyncio.wait({waiter}, timeout=1.0)
                if not waiter.done() and await request.is_disconnected():
                    waiter.cancel()
                    flight.abort("client disconnected")
                    return Response(status_code=499)
            outcome = waiter.result()
        finally:
            waiter.cancel()
        if isinstance(outcome, Finished) and outcome.ok:
            finished = outcome.request  # the same body run-batch writes for it, under the request's own id
            return JSONResponse(completion_body(finished, self.tokenizer, self.config.model_name, finished.custom_id))
        raise failure(outcome)

    async def stream(self, flight: InFlight, include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events: the text as it is generated, then the finish reason (and usage), then [DONE]."""
        req = flight.req
        chunks, text = Chunks(req, self.config.model_name), TextStream(req, self.tokenizer)
        over = False
        try:
            if req.kind == "chat":
                yield sse(chunks.delta(""))  # the role comes first, as OpenAI sends it
            while not over:
                event = await flight.next()
                if isinstance(event, Tokens):
                    delta = text.add(event.ids)
                    if delta:
                        yield sse(chunks.delta(delta))
                    continue
                over = True
                if isinstance(event, Finished) and event.ok:
                    yield sse(chunks.delta(text.finish(event.request), event.request.finish_reason))
                    if include_usage:
                        yield sse(chunks.usage(event.request))
                else:
                    yield sse(failure(event).body())
                yield "data: [DONE]\n\n"
        finally:
            if not over:  # the client went away mid-stream (the server cancelled this generator)
                flight.abort("client disconnected")


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
