"""The correlation map and its depth scale, against Monte Carlo and the edge of chaos."""

import math

import numpy as np
import pytest

from bpexp.config import Activation
from bpexp.correlations import (
    chi_c,
    correlation_depth_scale,
    correlation_fixed_point,
    correlation_map,
    trainable_depth,
)
from bpexp.theory import chi1, edge_of_chaos

TANH = Activation.tanh


@pytest.mark.parametrize(("q", "c"), [(0.5, 0.0), (1.5, 0.3), (3.0, 0.9)])
def test_expectations_match_monte_carlo(q, c):
    rng = np.random.default_rng(0)
    z1, z2 = rng.standard_normal((2, 2_000_000))
    u1, u2 = math.sqrt(q) * z1, math.sqrt(q) * (c * z1 + math.sqrt(1 - c * c) * z2)
    sigma_w2, sigma_b2 = 2.0, 0.05
    mc_map = (sigma_w2 * np.mean(np.tanh(u1) * np.tanh(u2)) + sigma_b2) / q
    mc_chi = sigma_w2 * np.mean((1 - np.tanh(u1) ** 2) * (1 - np.tanh(u2) ** 2))
    assert correlation_map(TANH, c, q, sigma_w2, sigma_b2) == pytest.approx(mc_map, abs=2e-3)
    assert chi_c(TANH, c, q, sigma_w2) == pytest.approx(mc_chi, abs=2e-3)


def test_chi_c_at_full_correlation_is_chi1():
    assert chi_c(TANH, 1.0, 1.3, 2.5) == pytest.approx(chi1(TANH, 1.3, 2.5), rel=1e-6)


def test_fixed_point_is_one_when_ordered_and_a_root_below_one_when_chaotic():
    assert correlation_fixed_point(TANH, 0.8, 0.05)[1] == 1.0
    q, c = correlation_fixed_point(TANH, 4.0, 0.05)
    assert 0.0 < c < 1.0
    assert correlation_map(TANH, c, q, 4.0, 0.05) == pytest.approx(c, abs=1e-9)
    assert chi_c(TANH, c, q, 4.0) < 1.0  # the chaotic fixed point is stable


def test_depth_scale_peaks_at_the_edge_of_chaos():
    edge = edge_of_chaos(TANH, 0.05)
    near = [correlation_depth_scale(TANH, edge * f, 0.05) for f in (0.97, 1.03)]
    far = [correlation_depth_scale(TANH, w2, 0.05) for w2 in (0.5, 4.0)]
    assert min(near) > 5 * max(far) > 0
    # Ordered phase: ξ_c = -1/ln χ1(q*), the gradient's own depth scale (Schoenholz et al. eq. 9).
    q, _ = correlation_fixed_point(TANH, 0.5, 0.05)
    assert correlation_depth_scale(TANH, 0.5, 0.05) == pytest.approx(-1 / math.log(chi1(TANH, q, 0.5)))
    assert trainable_depth(TANH, 0.5, 0.05) == pytest.approx(6 * correlation_depth_scale(TANH, 0.5, 0.05))
