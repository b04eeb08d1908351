"""Calibration observation: forward passes with hooks that record routing and expert-input stats."""
from .observer import ExpertObserver
from .stats import LayerStats

__all__ = ["ExpertObserver", "LayerStats"]
