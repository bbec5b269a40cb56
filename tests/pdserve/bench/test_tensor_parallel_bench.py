"""`python -m pdserve.bench.tensor_parallel` runs its three settings and reports ratios (no timing asserted)."""

from __future__ import annotations

from pdserve.bench.tensor_parallel import TPBench, report, run, settings


def test_bench_runs_every_setting_and_reports_ratios(tiny_models):
    bench = TPBench(model=str(tiny_models["llama"]), degree=2, batch=2, context=20, steps=3, repeats=1)
    rows = run(bench)
    assert list(rows) == [label for label, _, _ in settings(bench)]
    assert all(len(r) == 1 and r[0]["step_ms"] > 0 for r in rows.values())
    text = report(bench, rows)
    assert "TP2 x1 thr/rank" in text and "vs TP1 x1 thr" in text
