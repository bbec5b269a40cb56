"""The dashboard's HTTP server: the page, its static files, /api/state and Prometheus /metrics.

Runs in a background thread of the process that drives the batch; binds to
localhost by default. Every file the page needs is served by this server, so it
works with no network: ours from pdserve/observability/dashboard/static, and the
charting library, plotly.js, from the installed `plotly` package.
"""

from __future__ import annotations

import functools
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from pdserve.observability.dashboard.collector import MetricsCollector

STATIC = Path(__file__).resolve().parent / "static"
PLOTLY_JS = "plotly.min.js"
_TYPES = {".js": "application/javascript", ".css": "text/css", ".html": "text/html; charset=utf-8"}


@functools.lru_cache(maxsize=1)
def plotly_js() -> str:
    """The plotly.js bundle of the installed `plotly` package (one file, no further downloads)."""
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def asset(name: str) -> tuple[bytes, str] | None:
    """(bytes, content type) of a file the page loads by name, or None: no paths, only our files."""
    if name == PLOTLY_JS:
        return plotly_js().encode(), _TYPES[".js"]
    path = STATIC / name
    if "/" in name or "\\" in name or path.suffix not in _TYPES or not path.is_file():
        return None
    return path.read_bytes(), _TYPES[path.suffix]


def page_html(inline: bool, state_json: str | None = None) -> str:
    """The dashboard page: linked assets (live) or everything inline (one self-contained report file)."""
    html = (STATIC / "dashboard.html").read_text()
    if inline:
        style = f"<style>\n{(STATIC / 'dashboard.css').read_text()}</style>"
        script = f"<script>\n{plotly_js()}</script>\n<script>\n{(STATIC / 'dashboard.js').read_text()}</script>"
    else:
        style = '<link rel="stylesheet" href="static/dashboard.css">'
        script = f'<script src="static/{PLOTLY_JS}"></script>\n<script src="static/dashboard.js"></script>'
    state = ""
    if state_json is not None:
        state = "<script>window.PDSERVE_STATE = " + state_json.replace("</", "<\\/") + ";</script>"
    return html.replace("<!--STYLE-->", style).replace("<!--SCRIPT-->", script).replace("<!--STATE-->", state)


class DashboardServer:
    def __init__(self, collector: MetricsCollector, host: str = "127.0.0.1", port: int = 0) -> None:
        self.collector = collector
        handler = _handler(collector)
        self._httpd = ThreadingHTTPServer((host, port), handler)
        self._httpd.daemon_threads = True
        self.host, self.port = self._httpd.server_address[:2]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="dashboard", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def _handler(collector: MetricsCollector):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format, *args):  # noqa: A002
            """Stay quiet: the batch owns stderr."""

        def _send(self, body: bytes, content_type: str, status: int = 200) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            try:
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):  # the page was closed mid-download: nothing to do
                self.close_connection = True

        def do_GET(self):  # noqa: N802 - http.server's name
            path = self.path.split("?", 1)[0]
            if path in ("/", "/index.html"):
                self._send(page_html(inline=False).encode(), _TYPES[".html"])
            elif path == "/api/state":
                self._send(json.dumps(collector.state()).encode(), "application/json")
            elif path == "/metrics":
                self._send(collector.prometheus(), "text/plain; version=0.0.4; charset=utf-8")
            elif path.startswith("/static/") and (found := asset(path[len("/static/"):])) is not None:
                self._send(*found)
            else:
                self._send(b"not found", "text/plain", 404)

    return Handler
