"""Optimizers: Goldstone-GD (paper Algorithm 1), its gauge solvers and the coupling psi."""

from .coupling import Coupling
from .goldstone import GoldstoneGD, NonFiniteGaugeInput

__all__ = ["Coupling", "GoldstoneGD", "NonFiniteGaugeInput"]
