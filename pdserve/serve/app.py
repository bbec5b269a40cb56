"""The ASGI app of `pdserve serve`: the OpenAI routes (routes.py), health, Prometheus metrics and the live
dashboard, with errors answered in OpenAI's shape."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException

from pdserve.observability.dashboard.server import asset, page_html
from pdserve.openai.responses import error_body
from pdserve.serve.errors import ApiError
from pdserve.serve.loop import ServingLoop
from pdserve.serve.routes import AppConfig, CompletionRoutes


def build_app(config: AppConfig, loop: ServingLoop, tokenizer: Any) -> FastAPI:
    app = FastAPI(title="pdserve", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.include_router(CompletionRoutes(config, loop, tokenizer).router())
    app.include_router(MonitoringRoutes(loop).router())
    return app


async def api_error(_: Request, e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def http_error(_: Request, e: HTTPException) -> JSONResponse:
    """Starlette's own errors (no such route, wrong method) in OpenAI's shape."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
    return JSONResponse(error_body(str(e.detail), "invalid_request_error", code), status_code=e.status_code)


class MonitoringRoutes:
    """/health, /metrics (Prometheus) and /dashboard/ (the live page and what it reads)."""

    def __init__(self, loop: ServingLoop) -> None:
        self.loop = loop

    def router(self) -> APIRouter:
        routes = APIRouter()
        routes.add_api_route("/health", self.health, methods=["GET"])
        routes.add_api_route("/metrics", self.metrics, methods=["GET"])
        routes.add_api_route("/dashboard", self.dashboard_redirect, methods=["GET"])
        routes.add_api_route("/dashboard/", self.dashboard, methods=["GET"])
        routes.add_api_route("/dashboard/api/state", self.dashboard_state, methods=["GET"])
        routes.add_api_route("/dashboard/static/{name}", self.dashboard_static, methods=["GET"])
        return routes

    async def health(self) -> Response:
        if self.loop.error:
            return JSONResponse({"status": "error", "error": self.loop.error}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics(self) -> Response:
        return Response(self.loop.collector.prometheus(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def dashboard_redirect(self) -> Response:
        return RedirectResponse("/dashboard/")

    async def dashboard(self) -> Response:
        return Response(page_html(inline=False), media_type="text/html; charset=utf-8")

    async def dashboard_state(self) -> Response:
        return JSONResponse(self.loop.collector.state())

    async def dashboard_static(self, name: str) -> Response:
        found = asset(name)
        if found is None:
            raise HTTPException(404, f"no dashboard file {name!r}")
        return Response(found[0], media_type=found[1])
