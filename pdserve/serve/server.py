"""`pdserve serve`: start (or attach to) the workers, the router thread and uvicorn.

`start_server` returns once the server answers; `serve_forever` is the
command, which runs until Ctrl-C or SIGTERM. Local workers are started like
run-batch's (same engine and cluster flags) and stopped with the server; with
`deployment`, requests go to a running `pdserve up` deployment instead.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import uvicorn

from engine.config import EngineConfig
from pdserve.observability.dashboard.collector import MetricsCollector
from pdserve.observability.metrics import SLO
from pdserve.openai.limits import model_limits
from pdserve.runtime.backend import Backend
from pdserve.runtime.cluster import ClusterConfig
from pdserve.serve.admission import Admission, AdmissionConfig
from pdserve.serve.app import build_app
from pdserve.serve.loop import ServingLoop
from pdserve.serve.routes import AppConfig
from proto.workers import WorkerSet
from router.router import RouterConfig

log = logging.getLogger("pdserve.serve")


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port
    api_key: str | None = None
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    slo: SLO = field(default_factory=SLO)
    default_max_tokens: int = 512
    request_timeout_s: float = 600.0


@dataclass
class RunningServer:
    url: str
    loop: ServingLoop
    workers: WorkerSet | None  # the workers served (a deployment's, as its router reported them)
    backend: Backend
    _uvicorn: Any
    _thread: threading.Thread

    def stop(self) -> None:
        self._uvicorn.should_exit = True
        self._thread.join(timeout=30)
        self.loop.stop()
        self.backend.close()


def start_server(engine: EngineConfig, cluster: ClusterConfig, router_config: RouterConfig, options: ServeOptions,
                 deployment: str | None = None, workers: WorkerSet | None = None) -> RunningServer:
    """Serve until `stop()`. `workers`: serve these running workers (left running at stop)."""
    tokenizer, name, limits = model_limits(engine, options.default_max_tokens, ignore_eos=False)
    collector = MetricsCollector(options.slo, title=f"pdserve serve: {name}")
    backend = Backend.open(engine, cluster, router_config, deployment, workers)
    try:
        loop = ServingLoop(lambda on_finished, on_tokens: backend.make_router(
            on_finished, on_tokens=on_tokens, on_prefill_batch=collector.prefill_batch),
            Admission(options.admission, options.slo), collector)
        app = build_app(AppConfig(name, limits, options.api_key, options.request_timeout_s), loop, tokenizer)
        server, thread = _start_uvicorn(app, options.host, options.port, loop)
    except BaseException:
        backend.close()
        raise
    port = server.servers[0].sockets[0].getsockname()[1]
    served = backend.workers if backend.workers is not None else loop.router.workers
    return RunningServer(f"http://{options.host}:{port}", loop, served, backend, server, thread)


def _start_uvicorn(app: Any, host: str, port: int, loop: ServingLoop) -> tuple[uvicorn.Server, threading.Thread]:
    """uvicorn on its own thread, once it answers; the serving loop is stopped if it cannot."""
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off",
                                           timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            loop.stop()
            raise OSError(f"could not serve on {host}:{port} (is the port taken?)")
        time.sleep(0.05)
    return server, thread


def serve_forever(engine: EngineConfig, cluster: ClusterConfig, router_config: RouterConfig, options: ServeOptions,
                  deployment: str | None = None) -> None:
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops as cleanly as Ctrl-C
    running = start_server(engine, cluster, router_config, options, deployment)
    print(f"pdserve: serving the OpenAI API on {running.url}/v1 (dashboard {running.url}/dashboard/, "
          f"Prometheus {running.url}/metrics); Ctrl-C stops", flush=True)
    try:
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C (or SIGTERM) stops the server
            while running._thread.is_alive():
                time.sleep(0.5)
    finally:
        running.stop()
