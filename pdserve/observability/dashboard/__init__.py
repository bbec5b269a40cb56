"""Per-stage goodput dashboards: live (served while a batch runs), Prometheus, and the batch report."""
