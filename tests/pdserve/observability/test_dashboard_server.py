"""The live dashboard's HTTP server keeps quiet and keeps serving when a client goes away mid-download
(a tab closed while the 4.8 MB plotly bundle is on its way printed a traceback into the batch's stderr)."""

from __future__ import annotations

import socket
import struct
import threading
import time
import urllib.request
from http.server import ThreadingHTTPServer

from pdserve.observability.dashboard.collector import MetricsCollector
from pdserve.observability.dashboard.server import _handler
from pdserve.observability.metrics import SLO


def test_a_client_reset_mid_download_is_not_an_error(capfd):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(MetricsCollector(SLO())))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        client = socket.create_connection(("127.0.0.1", port))
        client.sendall(b"GET /static/plotly.min.js HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert client.recv(1000).startswith(b"HTTP/1.0 200")
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # RST while the body is still being written
        time.sleep(0.5)
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).status == 200
    finally:
        server.shutdown()
    assert "Traceback" not in capfd.readouterr().err
