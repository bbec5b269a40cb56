"""`pdserve report OUT.jsonl -o report.html`: the dashboard's panels for a finished batch, in one file."""

from __future__ import annotations

import json
from pathlib import Path

from pdserve.observability.dashboard.server import page_html
from pdserve.observability.dashboard.state import dashboard_state
from pdserve.observability.metrics import SLO, from_record


def load_records(path: Path) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{number} is not a run-batch output line: {e.msg}") from e
    if not records:
        raise ValueError(f"{path} holds no output lines")
    return records


def build_report(output_path: Path, slo: SLO) -> tuple[str, dict]:
    """(self-contained HTML, the state it shows)."""
    records = load_records(output_path)
    state = dashboard_state([from_record(r) for r in records], slo, total_lines=len(records),
                            title=f"pdserve report: {output_path.name}")
    return page_html(inline=True, state_json=json.dumps(state)), state


def write_report(output_path: Path, report_path: Path, slo: SLO) -> dict:
    html, state = build_report(output_path, slo)
    report_path.write_text(html, encoding="utf-8")
    return state
