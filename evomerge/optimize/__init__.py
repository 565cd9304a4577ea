"""Optimizers over the unit cube behind one ask/tell interface (fitness is maximized)."""

from evomerge.optimize.base import Candidate, Optimizer, OptimizerError
from evomerge.optimize.registry import KINDS, load_optimizer, make_optimizer, state_path

__all__ = [
    "KINDS",
    "Candidate",
    "Optimizer",
    "OptimizerError",
    "load_optimizer",
    "make_optimizer",
    "state_path",
]
