"""Quadrature rules on [0, 1] as data: IG's path integral ∫ f(α) dα ≈ Σ_k w_k f(α_k).

The base rules are captum's (Gauss-Legendre and the four Riemann sums, same nodes; see `riemann` for the one
weight that differs), and the sinh substitution is one more rule built from a base rule: nodes α(t_k),
weights w_k·α'(t_k).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import AttributionError

METHODS: tuple[str, ...] = ("gausslegendre", "riemann_trapezoid", "riemann_middle", "riemann_left", "riemann_right")
START_CENTER = 0.4
START_WIDTH = 0.08


@dataclass(frozen=True)
class Rule:
    """Nodes α_k in [0, 1] and their weights w_k."""

    nodes: np.ndarray
    weights: np.ndarray

    def integrate(self, f: Callable[[np.ndarray], np.ndarray]) -> float:
        return float(np.dot(self.weights, f(self.nodes)))


def gauss_legendre(n: int) -> Rule:
    """Exact for polynomials of degree ≤ 2n − 1."""
    x, w = np.polynomial.legendre.leggauss(n)
    return Rule(0.5 * (1 + x), 0.5 * w)


def riemann(n: int, kind: str) -> Rule:
    """left/right: exact for constants; middle/trapezoid: for degree ≤ 1.

    captum's nodes, and its weights except for the trapezoid: captum spaces those nodes 1/(n − 1) apart but
    weights them 1/n, so its weights sum to (n − 1)/n and no attribution can be complete; here they sum to 1.
    """
    if n < 2:
        raise AttributionError("Riemann rules need at least 2 steps.")
    if kind == "trapezoid":
        weights = np.full(n, 1 / (n - 1))
        weights[[0, -1]] /= 2
        return Rule(np.linspace(0, 1, n), weights)
    weights = np.full(n, 1 / n)
    offset = {"left": 0.0, "middle": 0.5, "right": 1.0}[kind]
    return Rule((np.arange(n) + offset) / n, weights)


@dataclass(frozen=True)
class SinhSubstitution:
    """The path variable α = c + w·sinh(A·t − B), with A and B such that t = 0, 1 give α = 0, 1.

    IG integrates ds/dα over α ∈ [0, 1]; on both offline models that integrand is a narrow peak near
    α ≈ 0.3-0.5, which Gauss-Legendre in α resolves only with ~20 nodes. Integrating over t instead
    (dα = α'(t) dt) crowds the nodes around α = c: the sinh transformation of Johnston & Elliott (2005)
    for nearly singular integrands. The integral, and so every exact IG attribution, is unchanged.
    """

    center: float = START_CENTER
    width: float = START_WIDTH

    def __post_init__(self):
        if not (0 < self.center < 1 and self.width > 0):
            raise AttributionError("The sinh substitution needs a center strictly between 0 and 1 and a width > 0.")

    def alpha(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """α(t) and dα/dt."""
        shift = math.asinh(self.center / self.width)
        scale = math.asinh((1 - self.center) / self.width) + shift
        return (self.center + self.width * np.sinh(scale * t - shift), self.width * scale * np.cosh(scale * t - shift))

    def apply(self, rule: Rule) -> Rule:
        """The rule in t turned into a rule in α."""
        alpha, slope = self.alpha(rule.nodes)
        return Rule(alpha, rule.weights * slope)


@dataclass(frozen=True)
class Quadrature:
    """The name of a rule, as results record it: `method` with n_steps nodes, in α or (substitution) in t."""

    n_steps: int
    method: str
    substitution: SinhSubstitution | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise AttributionError(f"Unknown integration method {self.method!r}; choose one of {', '.join(METHODS)}.")

    def rule(self) -> Rule:
        base = (
            gauss_legendre(self.n_steps)
            if self.method == "gausslegendre"
            else riemann(self.n_steps, self.method.removeprefix("riemann_"))
        )
        return self.substitution.apply(base) if self.substitution else base

    def describe(self) -> str:
        rule = f"{self.n_steps} steps"
        return f"{rule}, sinh-substituted" if self.substitution else rule
