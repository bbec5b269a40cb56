"""The Ray runtime: workers launched as actors where the user asks, and long-lived deployments."""
