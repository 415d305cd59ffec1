"""How two inputs' correlation propagates through a deep net at initialization, and how deep it trains.

Poole et al. 2016 and Schoenholz et al. 2017 ("Deep Information Propagation"). At the length map's
fixed point q* (bpexp.theory), two inputs whose pre-activations have correlation c^(l) map to

    c^(l+1) = (σ_w² E[f(u1) f(u2)] + σ_b²) / q*,   u1 = √q* z1,  u2 = √q* (c z1 + √(1 − c²) z2)
    χ_c(c)  = σ_w² E[f'(u1) f'(u2)]                 (the slope of that map; χ_c(1) = χ1)

with z1, z2 independent N(0, 1). c* = 1 is stable in the ordered phase (χ1 < 1); past the edge of
chaos it loses stability to a fixed point c* < 1. Either way the correlation approaches c* like
exp(−l/ξ_c) with ξ_c = −1/ln χ_c(c*), which diverges at the edge of chaos. Schoenholz et al. found that
a net trains when its depth is below about 6 ξ_c: deeper, the inputs' geometry is forgotten (ordered)
or scrambled (chaotic) before the signal reaches the output. `trainable_depth` draws that line.

Everything here is numpy on floats, like bpexp.theory; the two-dimensional Gaussian expectations use a
tensor Gauss–Hermite rule, enough for the smooth activations (tanh, sigmoid, erf-like) these maps are
drawn for at q* ≲ 10 (checked against Monte Carlo in tests/test_correlations.py).
"""

from __future__ import annotations

import math

import numpy as np

from bpexp.config import Activation
from bpexp.theory import ACTIVATIONS, chi1, fixed_point

TRAINABLE_DEPTHS = 6.0  # Schoenholz et al. 2017, Fig. 5: nets train to a depth of about 6 ξ_c
_NODES, _WEIGHTS = np.polynomial.hermite_e.hermegauss(80)
_WEIGHTS = _WEIGHTS / _WEIGHTS.sum()  # a probability rule for N(0, 1)
_Z1, _Z2 = np.meshgrid(_NODES, _NODES, indexing="ij")
_W2 = np.outer(_WEIGHTS, _WEIGHTS)


def _pair(q: float, c: float) -> tuple[np.ndarray, np.ndarray]:
    """Quadrature nodes of (u1, u2): two N(0, q) variables with correlation c."""
    c = min(max(c, -1.0), 1.0)
    s = math.sqrt(q)
    return s * _Z1, s * (c * _Z1 + math.sqrt(1.0 - c * c) * _Z2)


def correlation_map(activation: Activation, c: float, q: float, sigma_w2: float, sigma_b2: float) -> float:
    """c^(l+1) from c^(l) at second moment q: (σ_w² E[f(u1) f(u2)] + σ_b²) / q."""
    f, _ = ACTIVATIONS[activation]
    u1, u2 = _pair(q, c)
    return float((sigma_w2 * np.sum(_W2 * f(u1) * f(u2)) + sigma_b2) / q)


def chi_c(activation: Activation, c: float, q: float, sigma_w2: float) -> float:
    """χ_c(c) = σ_w² E[f'(u1) f'(u2)]: how a small change of c^(l) carries to c^(l+1)."""
    _, f_prime = ACTIVATIONS[activation]
    u1, u2 = _pair(q, c)
    return float(sigma_w2 * np.sum(_W2 * f_prime(u1) * f_prime(u2)))


def correlation_fixed_point(activation: Activation, sigma_w2: float, sigma_b2: float) -> tuple[float, float]:
    """(q*, c*): c* = 1 in the ordered phase (χ1(q*) ≤ 1), else the stable root of c-map(c) = c below 1.

    The c-map is increasing with c-map(1) = 1; past the edge of chaos its slope at 1 is χ1 > 1, so
    c-map(c) − c changes sign once on [0, 1): bisection finds it (c-map(0) ≥ 0 for σ_b² ≥ 0 and
    odd f, so the root is in [0, 1)).
    """
    q = fixed_point(activation, sigma_w2, sigma_b2)
    if q == 0.0 or not math.isfinite(q) or chi1(activation, q, sigma_w2) <= 1.0:
        return q, 1.0
    lo, hi = 0.0, 1.0 - 1e-9
    if correlation_map(activation, lo, q, sigma_w2, sigma_b2) - lo <= 0.0:
        return q, 0.0
    for _ in range(80):
        mid = (lo + hi) / 2
        if correlation_map(activation, mid, q, sigma_w2, sigma_b2) > mid:
            lo = mid
        else:
            hi = mid
    return q, (lo + hi) / 2


def correlation_depth_scale(activation: Activation, sigma_w2: float, sigma_b2: float) -> float:
    """ξ_c = −1/ln χ_c(c*): the depth over which two inputs' correlation relaxes to c*; inf at the edge."""
    q, c = correlation_fixed_point(activation, sigma_w2, sigma_b2)
    chi = chi1(activation, q, sigma_w2) if c == 1.0 else chi_c(activation, c, q, sigma_w2)
    log_chi = math.log(chi) if chi > 0 else -math.inf
    return math.inf if log_chi == 0.0 else -1.0 / log_chi


def trainable_depth(activation: Activation, sigma_w2: float, sigma_b2: float) -> float:
    """The depth below which Schoenholz et al. 2017 found nets to train: TRAINABLE_DEPTHS · |ξ_c|.

    ReLU-like activations have no chaotic fixed point with finite q* (past σ_w² = 1/c the signal grows
    without bound, and χ_c(1) = χ1 > 1 gives a negative ξ_c): their line is 6/|ln χ1|, the depth over
    which gradients grow or shrink by e^6.
    """
    return TRAINABLE_DEPTHS * abs(correlation_depth_scale(activation, sigma_w2, sigma_b2))
