"""Structured outputs: constraints (spec.py, light: the driver imports it), per-request matchers
(matcher.py), token bitmasks (bitmask.py) and the masks of speculative drafts (drafts.py).
Grammar engine: llguidance, chosen by measurement (docs/structured_outputs.md).

Nothing is imported here, so `engine.config` can import `engine.structured.spec` without torch.
"""
