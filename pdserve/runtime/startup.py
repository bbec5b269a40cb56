"""Start-up timing that the driver and the worker actors both log (`pdserve -v`)."""

from __future__ import annotations

import time


def process_age_s() -> float:
    """Seconds since this process started (Ray worker boot and imports, for an actor entering __init__)."""
    import psutil

    return time.time() - psutil.Process().create_time()
