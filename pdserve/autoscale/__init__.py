"""The goodput autoscaler: a pure controller (controller.py) and its simulation at scale (simulate.py)."""
