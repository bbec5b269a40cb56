"""The live dashboard and the batch report, rendered by headless Chromium with every host but loopback
unreachable, and checked against the output file: tiles, the limiting stage, and plotly's rendered
charts (their traces and axis titles, read from the SVG plotly drew)."""

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
from pdserve.observability.dashboard.server import PLOTLY_JS, DashboardServer, plotly_js
from pdserve.observability.dashboard.state import LIMIT_WINDOW_S, dashboard_state
from pdserve.observability.limiting import limiting_stage
from pdserve.observability.metrics import SLO, from_record, offered_served, summarize
from pdserve.runtime.cluster import ClusterConfig
from router.router import RouterConfig
from tests.system.test_faults import write_batch

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--window-size=1400,2600", "--virtual-time-budget=20000",
         # Offline: no name resolves and every connection but loopback goes to a dead proxy.
         "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1", "--proxy-server=http://127.0.0.1:9"]
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
    "spec-acceptance": lambda s: s["speculative"]["acceptance_rate"],
    "spec-tpf": lambda s: s["speculative"]["tokens_per_forward"],
    "spec-gamma": lambda s: s["speculative"]["gamma_mean"],
}
TIME = "time since the first arrival (s)"


def expected_charts(state: dict) -> dict[str, tuple[set[str], list[str] | None]]:
    """Chart id -> (axis titles, legend entries in order; None: no legend) that plotly must have drawn."""
    ser = state["series"]
    hist = lambda x: ({x, "requests"}, None)  # noqa: E731
    return {
        "chart-rates": ({TIME, "requests/s"}, ["offered", "served", "goodput"]),
        "chart-attainment": ({TIME, "share within SLO"}, ["prefill", "transfer", "decode"]),
        "chart-stages": ({TIME, "requests"}, ["queued", "prefill", "transfer", "decode"]),
        "chart-queue": ({TIME, "queued requests"}, list(ser["queue_depth"])),
        "chart-kv": ({TIME, "KV blocks"}, list(ser["kv_blocks"])),
        "chart-batch": ({TIME, "sequences in the batch"}, list(ser["decode_batch"])),
        "chart-spec": ({TIME, "draft acceptance rate", "tokens per target forward, γ"},
                       ["acceptance rate", "tokens per target forward", "mean γ"]),
        "hist-ttft": hist("TTFT (s)"), "hist-tpot": hist("TPOT (s)"), "hist-e2e": hist("end-to-end latency (s)"),
        "hist-queue": hist("queue wait (s)"), "hist-transfer": hist("KV transfer rate (GB/s)"),
        "gantt": ({TIME, "request (sample)"}, None),
    }


_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class _Page(HTMLParser):
    """The rendered DOM: attributes by id, and per chart what plotly drew in it (SVG roots, trace
    groups, axis-title and legend texts)."""

    def __init__(self) -> None:
        super().__init__()
        self.by_id: dict[str, dict[str, str]] = {}
        self.body: dict[str, str] = {}
        self.charts: dict[str, dict] = {}
        self._stack: list[tuple[str, str | None, str | None]] = []  # (tag, chart id, "title"/"legend"/None)

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        if tag == "body":
            self.body = a
        if "id" in a:
            self.by_id[a["id"]] = a
        if tag in _VOID:
            return
        classes = set(a.get("class", "").split())
        chart = self._stack[-1][1] if self._stack else None
        if "chart" in classes and "id" in a:
            chart = a["id"]
            self.charts[chart] = {"svg": 0, "traces": 0, "ticks": 0, "modebar": 0, "titles": set(), "legend": []}
        if chart is not None:
            c = self.charts[chart]
            c["svg"] += tag == "svg" and "main-svg" in classes
            c["traces"] += tag == "g" and "trace" in classes
            c["ticks"] += tag == "g" and bool(classes & {"xtick", "ytick"})
            c["modebar"] += "modebar" in classes  # zoom, pan, reset: plotly's tool bar
        kind = "title" if classes & {"xtitle", "ytitle", "y2title"} else "legend" if "legendtext" in classes else None
        self._stack.append((tag, chart, kind))

    def handle_endtag(self, tag):
        for i in range(len(self._stack) - 1, -1, -1):
            if self._stack[i][0] == tag:
                del self._stack[i:]
                return

    def handle_data(self, data):
        if self._stack and self._stack[-1][1] is not None and self._stack[-1][2] is not None:
            c = self.charts[self._stack[-1][1]]
            c["titles"].add(data) if self._stack[-1][2] == "title" else c["legend"].append(data)


def render(url: str, screenshot: Path, profile: Path) -> _Page:
    assert CHROMIUM, "headless Chromium is installed by scripts/setup.sh (Debian package chromium)"
    common = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}"]
    subprocess.run([*common, f"--screenshot={screenshot}", url], check=True, capture_output=True, timeout=120)
    dom = subprocess.run([*common, "--dump-dom", url], check=True, capture_output=True, text=True, timeout=120)
    parsed = _Page()
    parsed.feed(dom.stdout)
    return parsed


def check_page(page: _Page, output: Path, slo: SLO, live: dict | None = None) -> None:
    """`live`: the live page's own state (api/state): its stage and queue charts count in-flight requests at
    each refresh (the router's states), not the finished requests' stages."""
    assert page.body.get("data-rendered") == "final", "the page did not render the final state"
    records = [json.loads(line) for line in output.read_text().splitlines()]
    metrics = [from_record(r) for r in records]
    expected = summarize(metrics, slo)
    for tile, pick in TILES.items():
        shown = page.by_id[tile].get("data-value")
        want = pick(expected)
        assert shown not in (None, ""), f"tile {tile} is empty"
        assert float(shown) == pytest.approx(want, rel=1e-9, abs=1e-12), f"{tile}: page {shown} != output {want}"
    rates = offered_served(metrics, window_s=LIMIT_WINDOW_S)
    for tile in ("offered", "served"):
        assert float(page.by_id[tile]["data-value"]) == pytest.approx(rates[f"{tile}_rps"], rel=1e-9)
    limit = limiting_stage(metrics, slo, window_s=LIMIT_WINDOW_S)
    assert page.by_id["limiting-stage"]["data-value"] == limit.stage
    charts = expected_charts(dashboard_state(metrics, slo))
    if live is not None:
        charts["chart-stages"] = ({TIME, "requests"}, list(live["live_series"]["in_stage"]))
        charts["chart-queue"] = ({TIME, "queued requests"}, list(live["live_series"]["queue_depth"]))
    for chart, (titles, legend) in charts.items():
        drawn = page.charts[chart]
        assert page.by_id[chart].get("data-drawn") == "1", f"{chart} was not drawn"
        assert drawn["svg"] >= 1 and drawn["traces"] >= (len(legend) if legend else 1), f"{chart}: {drawn}"
        assert drawn["ticks"] >= 4 and drawn["modebar"] >= 1, f"{chart}: no ticks or zoom tools: {drawn}"
        assert drawn["titles"] == titles, f"{chart}: axis titles {drawn['titles']} != {titles}"
        if legend is not None:
            assert drawn["legend"] == legend, f"{chart}: legend {drawn['legend']} != {legend}"


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
              EngineConfig(dtype="float32", device="cpu", kv_cache_gib=0.25, speculative="ngram",
                           num_speculative_tokens=3), ClusterConfig(), RouterConfig(),
              BatchOptions(progress=False, slo=slo), on_tick=peek, collector=collector)
    yield server, out, slo, tmp, seen_live
    server.stop()


def test_live_dashboard_shows_the_output_figures(finished_batch):
    server, out, slo, tmp, seen_live = finished_batch
    assert seen_live.get("live") and not seen_live["now"]["finished"], "no live state was served mid-batch"
    # Mid-batch, the offered rate counts every request submitted (all 24 at the start), finished or not.
    rates = seen_live["rates"]
    assert rates["offered_rps"] * rates["window_s"] == pytest.approx(24)
    assert rates["served_rps"] * rates["window_s"] == pytest.approx(seen_live["summary"]["succeeded"])
    shot = tmp / "dashboard.png"
    page = render(server.url, shot, tmp / "profile-live")
    assert shot.stat().st_size > 20_000
    live = json.loads(urllib.request.urlopen(server.url + "api/state", timeout=10).read())
    assert list(live["live_series"]["in_stage"]) == ["queued", "prefill", "admitting", "decode"]
    check_page(page, out, slo, live=live)
    metrics = urllib.request.urlopen(server.url + "metrics", timeout=10).read().decode()
    assert "pdserve_goodput_requests_per_second" in metrics and "pdserve_kv_blocks_total" in metrics
    records = [json.loads(line) for line in out.read_text().splitlines()]
    drafted = sum((r["pdserve"].get("speculative") or {}).get("drafted", 0) for r in records if r["error"] is None)
    assert re.search(rf"^pdserve_spec_draft_tokens_total {drafted}\.0$", metrics, re.M), "spec counters != records"
    for asset in ("static/dashboard.js", "static/dashboard.css", f"static/{PLOTLY_JS}"):  # everything served here
        assert urllib.request.urlopen(server.url + asset, timeout=10).status == 200


def test_report_shows_the_output_figures(finished_batch):
    _, out, slo, tmp, _ = finished_batch
    report = tmp / "report.html"
    write_report(out, report, slo)
    html = report.read_text()
    refs = _References()
    refs.feed(html)
    assert refs.found == [], f"the report must be one self-contained file, it loads {refs.found}"
    assert plotly_js() in html  # the charting library itself is inlined
    shot = tmp / "report.png"
    page = render(report.as_uri(), shot, tmp / "profile-report")
    assert shot.stat().st_size > 20_000
    check_page(page, out, slo)


class _References(HTMLParser):
    """Every attribute of the report's own tags that would load something (scripts' text is not parsed)."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if k in ("src", "href", "data", "srcset", "action") and v and not v.startswith("#"):
                self.found.append(f"<{tag} {k}={v}>")


class _OverloadedRouter:
    """A router's live face (snapshot, active, workers) during an overload that grows at each refresh."""

    def __init__(self) -> None:
        from types import SimpleNamespace

        self.workers = SimpleNamespace(decode={})
        self.active: dict = {}
        self.turn = 0
        self._ns = SimpleNamespace

    def grow(self) -> None:
        import time

        self.turn += 1
        for i in range(7):
            self.active[f"r{self.turn}-{i}"] = self._ns(custom_id=f"r{self.turn}-{i}",
                                                       timeline=self._ns(queued=time.time()))

    def snapshot(self) -> dict:
        t = self.turn
        return {"states": {"queued": 6 * t, "prefill": min(4, t), "admitting": t % 2, "decode": 8},
                "queue_depth": {"0-128": 2 * t, "129-512": 4 * t, "513+": 0}, "kv_blocks_held": {}}


def _gauges(metrics: str, name: str, label: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) for m in re.finditer(rf'^{name}{{{label}="([^"]+)"}} (\S+)$', metrics, re.M)}


def test_live_charts_show_an_overload_before_any_request_finishes(tmp_path):
    """Requests pile up and none has finished: the page leads with the backlog, and its stage and queue
    charts end at now with the numbers /metrics' pdserve_requests_in_state and queue depth give."""
    collector = MetricsCollector(SLO(ttft_s=2.0, tpot_s=0.15), title="pdserve: overload")
    router = _OverloadedRouter()
    for _ in range(5):
        router.grow()
        collector.refresh(router, every_s=0)
    server = DashboardServer(collector)
    try:
        page = render(server.url, tmp_path / "overload.png", tmp_path / "profile")
        metrics = urllib.request.urlopen(server.url + "metrics", timeout=10).read().decode()
    finally:
        server.stop()
    in_state = _gauges(metrics, "pdserve_requests_in_state", "state")
    queued = _gauges(metrics, "pdserve_queue_depth", "bucket")
    assert in_state == {"queued": 30, "prefill": 4, "admitting": 1, "decode": 8}  # the last refresh's snapshot
    for chart, want in (("chart-stages", in_state), ("chart-queue", queued)):
        assert page.by_id[chart].get("data-drawn") == "1", f"{chart} was not drawn with no request finished"
        assert json.loads(page.by_id[chart]["data-last"]) == want, chart
        assert page.charts[chart]["traces"] >= len(want)
    # the headline: what is in flight now, and where most of it waits
    assert "hidden" not in page.by_id["backlog"]
    assert {k: float(page.by_id[f"now-{k}"]["data-value"]) for k in in_state} == in_state
    assert float(page.by_id["now-in-flight"]["data-value"]) == sum(in_state.values())
    assert page.by_id["backlog-at"]["data-value"] == "queued"
    state = collector.state()  # the live series: one point per refresh, up to the last
    assert [s[-1] for s in state["live_series"]["in_stage"].values()] == list(in_state.values())
    assert len(state["live_series"]["t"]) == 5 and state["live_series"]["t"] == sorted(state["live_series"]["t"])
