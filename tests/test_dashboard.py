"""The live dashboard and the batch report, rendered by headless Chromium and checked against the output."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pytest

from engine.config import EngineConfig
from pdserve.batch.run import BatchOptions, run_batch
from pdserve.observability.dashboard.collector import MetricsCollector
from pdserve.observability.dashboard.report import write_report
from pdserve.observability.dashboard.server import DashboardServer
from pdserve.observability.metrics import SLO, from_record, summarize
from pdserve.runtime.cluster import ClusterConfig
from router.router import RouterConfig
from tests.test_faults import write_batch

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--window-size=1400,2600", "--virtual-time-budget=20000"]
TILES = {  # page element -> where the same figure lives in pdserve.observability.metrics.summarize()
    "goodput": lambda s: s["goodput_rps"],
    "slo-attainment": lambda s: s["slo_attainment"],
    "ttft-attainment": lambda s: s["stages"]["prefill"]["slo_attainment"],
    "tpot-attainment": lambda s: s["stages"]["decode"]["slo_attainment"],
    "throughput": lambda s: s["throughput_rps"],
    "prefill-tps": lambda s: s["stages"]["prefill"]["tokens_per_s"],
    "decode-tps": lambda s: s["stages"]["decode"]["tokens_per_s"],
    "ttft-mean": lambda s: s["stages"]["prefill"]["ttft_s"]["mean"],
    "tpot-mean": lambda s: s["stages"]["decode"]["tpot_s"]["mean"],
    "transfer-gbps": lambda s: s["stages"]["transfer"]["gbps"]["mean"],
    "cache-hit-rate": lambda s: s["stages"]["prefill"]["cache_hit_rate"],
    "cached-tokens": lambda s: s["stages"]["prefill"]["cached_tokens"],
    "kv-saved": lambda s: s["stages"]["transfer"]["bytes_saved"],
    "succeeded": lambda s: s["succeeded"],
    "failed": lambda s: s["failed"],
}
CHARTS = ("chart-goodput", "chart-stages", "chart-queue", "chart-kv", "chart-batch", "hist-ttft", "hist-tpot",
          "hist-e2e", "hist-queue", "hist-transfer", "gantt")


class _Attrs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.by_id: dict[str, dict[str, str]] = {}
        self.body: dict[str, str] = {}

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        if tag == "body":
            self.body = a
        if "id" in a:
            self.by_id[a["id"]] = a


def render(url: str, screenshot: Path, profile: Path) -> _Attrs:
    assert CHROMIUM, "headless Chromium is installed by scripts/setup.sh (Debian package chromium)"
    common = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}"]
    subprocess.run([*common, f"--screenshot={screenshot}", url], check=True, capture_output=True, timeout=120)
    dom = subprocess.run([*common, "--dump-dom", url], check=True, capture_output=True, text=True, timeout=120)
    parsed = _Attrs()
    parsed.feed(dom.stdout)
    return parsed


def check_page(page: _Attrs, output: Path, slo: SLO) -> None:
    assert page.body.get("data-rendered") == "final", "the page did not render the final state"
    records = [json.loads(line) for line in output.read_text().splitlines()]
    expected = summarize([from_record(r) for r in records], slo)
    for tile, pick in TILES.items():
        shown = page.by_id[tile].get("data-value")
        want = pick(expected)
        assert shown not in (None, ""), f"tile {tile} is empty"
        assert float(shown) == pytest.approx(want, rel=1e-9, abs=1e-12), f"{tile}: page {shown} != output {want}"
    for chart in CHARTS:
        assert page.by_id[chart].get("data-drawn") == "1", f"{chart} was not drawn"


@pytest.fixture(scope="module")
def finished_batch(ray_cluster, tmp_path_factory):
    """A batch run with the live dashboard on; the server stays up after it finishes."""
    tmp = tmp_path_factory.mktemp("dash")
    slo = SLO(ttft_s=3.0, tpot_s=0.2)
    collector = MetricsCollector(slo, title="pdserve: dashboard test")
    server = DashboardServer(collector)
    out = tmp / "out.jsonl"
    seen_live = {}

    def peek(router):  # while requests are in flight, the page's data source is live
        if not seen_live and router.active and len(collector.state().get("summary") or {}) > 0:
            seen_live.update(json.loads(urllib.request.urlopen(server.url + "api/state", timeout=10).read()))

    run_batch(write_batch(tmp / "in.jsonl", n=24, max_tokens=4, spread=40), out,
              EngineConfig(dtype="float32", device="cpu", kv_cache_gib=0.25), ClusterConfig(), RouterConfig(),
              BatchOptions(progress=False, slo=slo), on_tick=peek, collector=collector)
    yield server, out, slo, tmp, seen_live
    server.stop()


def test_live_dashboard_shows_the_output_figures(finished_batch):
    server, out, slo, tmp, seen_live = finished_batch
    assert seen_live.get("live") and not seen_live["now"]["finished"], "no live state was served mid-batch"
    shot = tmp / "dashboard.png"
    page = render(server.url, shot, tmp / "profile-live")
    assert shot.stat().st_size > 20_000
    check_page(page, out, slo)
    metrics = urllib.request.urlopen(server.url + "metrics", timeout=10).read().decode()
    assert "pdserve_goodput_requests_per_second" in metrics and "pdserve_kv_blocks_total" in metrics
    for asset in ("static/dashboard.js", "static/dashboard.css"):  # everything is served locally
        assert urllib.request.urlopen(server.url + asset, timeout=10).status == 200


def test_report_shows_the_output_figures(finished_batch):
    _, out, slo, tmp, _ = finished_batch
    report = tmp / "report.html"
    write_report(out, report, slo)
    html = report.read_text()
    assert not re.search(r"""(src|href)=["']?https?:|fetch\(["']https?:|@import""", html), \
        "the report must be self-contained"
    shot = tmp / "report.png"
    page = render(report.as_uri(), shot, tmp / "profile-report")
    assert shot.stat().st_size > 20_000
    check_page(page, out, slo)
