"""`pdserve plan`: how many prefill and decode workers a workload needs (DistServe's placement search).

profile.py measures per-stage step times on this hardware and fits linear models; model.py predicts
TTFT, TPOT and SLO attainment of each (prefill, decode, max batch) configuration from queueing theory;
report.py prints the recommendation and why.
"""
