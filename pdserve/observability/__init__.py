"""Metrics and dashboards: one definition behind the live page, Prometheus and the batch report."""
