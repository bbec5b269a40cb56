"""Speculative decoding: drafters, exact verification (Chen et al. 2023, Algorithm 2), γ from measurement.

No Ray, no workers: decode_worker/speculative.py drives these over a continuous batch.
"""

from engine.specdec.drafters import Drafter, LayerDrafter, NgramDrafter, lookup, make_drafter
from engine.specdec.gamma import AcceptanceTracker, CostModel, GammaChooser, best_gamma, omega
from engine.specdec.verify import Draft, Verifier, chen_residual, rejection_sample

__all__ = ["AcceptanceTracker", "CostModel", "Draft", "Drafter", "GammaChooser", "LayerDrafter", "NgramDrafter",
           "Verifier", "best_gamma", "chen_residual", "lookup", "make_drafter", "omega", "rejection_sample"]
