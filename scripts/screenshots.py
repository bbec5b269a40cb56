"""Regenerate docs/dashboard.png (live, mid-batch) and docs/report.png from the benchmark workload.

    .venv/bin/python scripts/screenshots.py
"""

import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from engine.config import EngineConfig
from engine.loader import load_tokenizer, resolve_model
from pdserve.batch.run import BatchOptions, run_batch
from pdserve.bench.workload import WorkloadSpec, make_workload, write_batch
from pdserve.observability.dashboard.collector import MetricsCollector
from pdserve.observability.dashboard.report import write_report
from pdserve.observability.dashboard.server import DashboardServer
from pdserve.observability.metrics import SLO
from pdserve.runtime.cluster import ClusterConfig
from router.router import RouterConfig

DOCS = Path(__file__).resolve().parent.parent / "docs"
CHROMIUM = shutil.which("chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--hide-scrollbars", "--window-size=1400,2500",
         "--virtual-time-budget=8000"]


def shoot(url: str, png: Path, profile: str) -> None:
    subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", f"--screenshot={png}", url], check=True,
                   capture_output=True, timeout=120)


def main() -> None:
    engine = EngineConfig(dtype="bfloat16")
    tokenizer = load_tokenizer(resolve_model(None, engine.cache_dir))
    slo = SLO(ttft_s=6.0, tpot_s=0.2)
    with tempfile.TemporaryDirectory() as tmp:
        batch = write_batch(make_workload(WorkloadSpec(), tokenizer), Path(tmp) / "in.jsonl",
                            "SmolLM2-135M-Instruct")
        collector = MetricsCollector(slo, title="pdserve: 64-request benchmark batch (bf16, 1P+1D)")
        server = DashboardServer(collector)
        taken = threading.Event()

        def midway(router):
            if not taken.is_set() and len(router.active) <= 40:  # a third of the batch finished
                taken.set()
                threading.Thread(target=shoot, args=(server.url, DOCS / "dashboard.png", f"{tmp}/p1")).start()

        out = Path(tmp) / "out.jsonl"
        run_batch(batch, out, engine, ClusterConfig(), RouterConfig(), BatchOptions(progress=False, slo=slo),
                  on_tick=midway, collector=collector)
        server.stop()
        report = Path(tmp) / "report.html"
        write_report(out, report, slo)
        shoot(report.as_uri(), DOCS / "report.png", f"{tmp}/p2")
    print(f"wrote {DOCS / 'dashboard.png'} and {DOCS / 'report.png'}")


if __name__ == "__main__":
    main()
