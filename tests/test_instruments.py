"""instruments.py against brute force, in float64: per-example gradients from torch.func.vmap over grad,
the Jacobian from torch.func.jacrev and a dense SVD, the Hessian from torch.autograd.functional.hessian.
The nets are functional (lists of W, b) so the checks do not depend on the MLP class."""

from __future__ import annotations

import math
from itertools import pairwise

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, jacrev, vmap

from bpexp import instruments
from bpexp.backprop import curvature, hessian_vector_product, loss_value
from bpexp.config import Activation, Loss, ModelConfig
from bpexp.model import ACTIVATIONS, build_mlp

F64 = torch.float64


def make_net(widths, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(n_out, n_in, generator=g, dtype=F64) * scale / math.sqrt(n_in),
            0.1 * torch.randn(n_out, generator=g, dtype=F64),
        )
        for n_in, n_out in pairwise(widths)
    ]


def forward(net, x, activation=Activation.tanh):
    """(output, [z^(1) … z^(L)], [a^(0) … a^(L-1)]) of the functional MLP."""
    f = ACTIVATIONS[activation]
    zs, inputs, a = [], [], x
    for l, (W, b) in enumerate(net, start=1):
        inputs.append(a)
        z = a @ W.T + b
        zs.append(z)
        a = z if l == len(net) else f(z)
    return a, zs, inputs


def example_loss(out, y, classification):
    """ℓ_n of one example (or the mean over a batch): cross-entropy, or MSE averaged over outputs."""
    return F.cross_entropy(out, y) if classification else F.mse_loss(out, y)


def deltas_and_inputs(net, x, y, classification):
    """δ^(l) = ∂L/∂z^(l) of the mean batch loss by autograd, with the layer inputs a^(l-1)."""
    net = [(W.clone().requires_grad_(), b.clone().requires_grad_()) for W, b in net]
    out, zs, inputs = forward(net, x)
    for z in zs:
        z.retain_grad()
    example_loss(out, y, classification).backward()
    return [z.grad for z in zs], [a.detach() for a in inputs]


def per_example_grads(net, x, y, classification):
    """(B, P_l) per layer: ∂ℓ_n/∂[W^(l), b^(l)] flattened, by vmap over grad."""

    def loss_one(params, xn, yn):
        out, _, _ = forward(params, xn.unsqueeze(0))
        return example_loss(out, yn.unsqueeze(0), classification)

    grads = vmap(grad(loss_one), in_dims=(None, 0, 0))(net, x, y)
    return [torch.cat([gW.flatten(1), gb], dim=1) for gW, gb in grads]


def brute_force_noise(per_example):
    """tr Σ, |G|² (unbiased), GSNR sum and count of one layer from its (B, P) per-example gradients."""
    B = per_example.shape[0]
    mean, var = per_example.mean(0), per_example.var(0, unbiased=True)
    trace = var.sum()
    moved = var > 1e-300
    return trace, mean.square().sum() - trace / B, (mean.square()[moved] / var[moved]).sum(), moved.sum()


def data(n, in_dim, out_dim, classification, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_dim, generator=g, dtype=F64)
    if classification:
        return x, torch.randint(0, out_dim, (n,), generator=g)
    return x, torch.randn(n, out_dim, generator=g, dtype=F64)


# ------------------------------------------------------------------------------------------ gradient noise
@pytest.mark.parametrize("classification", [False, True])
def test_gradient_noise_matches_per_example_gradients(classification):
    net = make_net([5, 7, 6, 3], seed=0)
    x, y = data(11, 5, 3, classification)
    delta, inputs = deltas_and_inputs(net, x, y, classification)
    noise = instruments.gradient_noise(delta, inputs)
    brute = [brute_force_noise(g) for g in per_example_grads(net, x, y, classification)]
    for field, index in (("trace_sigma", 0), ("grad_sq", 1), ("gsnr_sum", 2), ("gsnr_count", 3)):
        expected = torch.stack([b[index].to(F64) for b in brute])
        torch.testing.assert_close(getattr(noise, field), expected, rtol=1e-10, atol=0)
    total = noise.total()
    all_grads = torch.cat(per_example_grads(net, x, y, classification), dim=1)
    trace, g2, gsnr_sum, count = brute_force_noise(all_grads)
    torch.testing.assert_close(total["noise_scale"], trace / g2, rtol=1e-10, atol=0)
    torch.testing.assert_close(total["gsnr"], gsnr_sum / count, rtol=1e-10, atol=0)
    metrics = noise.metrics()
    assert {"grad_noise/l001", "gns/l003", "gsnr/l002", "grad_noise/total", "gns/total", "gsnr/total"} <= set(
        metrics
    )


def test_gradient_noise_skips_parameters_no_example_moves():
    """A dead ReLU-like unit (δ = 0 on every example) has 0/0 GSNR: it is left out, not counted as 0."""
    net = make_net([4, 6, 2], seed=3)
    x, y = data(9, 4, 2, classification=False)
    delta, inputs = deltas_and_inputs(net, x, y, False)
    delta[0][:, 2] = 0.0  # unit 2 of layer 1 never receives an error signal
    noise = instruments.gradient_noise(delta, inputs)
    assert noise.gsnr_count[0].item() == 6 * 5 - 5  # its 4 weights and 1 bias are out
    assert torch.isfinite(noise.gsnr).all()


def test_gradient_noise_with_a_member_dimension_equals_member_by_member():
    nets = [make_net([5, 8, 3], seed=s) for s in (0, 1, 2)]
    x, y = data(10, 5, 3, classification=False)
    per_member = [deltas_and_inputs(net, x, y, False) for net in nets]
    stacked = instruments.gradient_noise(
        [torch.stack([m[0][l] for m in per_member]) for l in range(2)],
        [torch.stack([m[1][l] for m in per_member]) for l in range(2)],
    )
    assert stacked.trace_sigma.shape == (3, 2)
    for i, (delta, inputs) in enumerate(per_member):
        alone = instruments.gradient_noise(delta, inputs)
        for field in ("trace_sigma", "grad_sq", "gsnr_sum", "gsnr_count"):
            torch.testing.assert_close(getattr(stacked, field)[i], getattr(alone, field), rtol=1e-12, atol=0)


def test_noise_scale_agrees_with_the_two_batch_size_estimator():
    """McCandlish et al. 2018, appendix A: from E‖G_B‖² = |G|² + tr Σ/B at two batch sizes,
    |G|² = (B_big‖G_big‖² − B_small‖G_small‖²)/(B_big − B_small), tr Σ = (‖G_small‖² − ‖G_big‖²)/(1/B_small
    − 1/B_big). Minibatches drawn with replacement from N examples, gradients averaged from vmap's
    per-example gradients (not from δ). Tolerance 5%: 200000 draws per size put the Monte Carlo error
    near 1%, while the unbiased |G|² of these N = 200 examples is 25% off the population's (48 vs 39)."""
    net = make_net([6, 12, 3], seed=4)
    x, y = data(200, 6, 3, classification=False, seed=5)
    delta, inputs = deltas_and_inputs(net, x, y, False)
    total = instruments.gradient_noise(delta, inputs).total()
    n = x.shape[0]
    # Drawing with replacement from these N examples samples their empirical distribution: its tr Σ divides
    # by N, not N − 1, and its |G|² is exactly ‖Ḡ‖² = |G|²_unbiased + tr Σ/N (the unbiased estimate
    # treats the N examples as a sample of a larger population, and is ~10% lower here).
    trace_pop = total["trace_sigma"] * (n - 1) / n
    g2_pop = total["grad_sq"] + total["trace_sigma"] / n
    population = (trace_pop / g2_pop).item()

    per_example = torch.cat(per_example_grads(net, x, y, False), dim=1)  # (N, P)
    g = torch.Generator().manual_seed(6)
    chunks, draws, small, big = 10, 20000, 4, 64
    sq = {}
    for b in (small, big):
        total = 0.0
        for _ in range(chunks):  # a minibatch gradient = (how often each example was drawn) @ per_example / B
            idx = torch.randint(0, n, (draws, b), generator=g)
            counts = torch.zeros(draws, n, dtype=F64).scatter_add_(1, idx, torch.ones(draws, b, dtype=F64))
            total += (counts @ per_example / b).square().sum(1).mean().item()
        sq[b] = total / chunks  # E‖G_B‖²
    g2 = (big * sq[big] - small * sq[small]) / (big - small)
    trace = (sq[small] - sq[big]) / (1 / small - 1 / big)
    assert 3 < trace / g2 < 300  # the net is in a regime where the estimator means something
    assert trace / g2 == pytest.approx(population, rel=0.05)


def test_noise_scale_ema_smooths_numerator_and_denominator_separately():
    ema = instruments.NoiseScaleEMA(decay=0.5)
    first = ema.update(torch.tensor(4.0, dtype=F64), torch.tensor(2.0, dtype=F64))
    assert first.item() == pytest.approx(2.0)  # bias correction: the first value is the first estimate
    second = ema.update(torch.tensor(8.0, dtype=F64), torch.tensor(-0.5, dtype=F64))  # |G|² < 0 happens
    # EMAs: tr Σ 0.5·2 + 0.5·8 = 5, |G|² 0.5·1 + 0.5·(−0.5) = 0.25 (the mean of the two ratios would be −7)
    assert second.item() == pytest.approx(20.0)
    with pytest.raises(ValueError, match="decay"):
        instruments.NoiseScaleEMA(decay=1.0)


# -------------------------------------------------------------------------------------- Jacobian spectrum
@pytest.mark.parametrize(
    ("activation", "residual"),
    [
        (Activation.tanh, False),
        (Activation.relu, False),
        (Activation.gelu, True),
        (Activation.identity, False),
    ],
)
def test_jacobian_spectrum_matches_jacrev_and_dense_svd(activation, residual):
    widths = [7, 9, 9, 9, 4]
    net = make_net(widths, seed=2, scale=1.5)
    weights, biases = [W for W, _ in net], [b for _, b in net]
    x, _ = data(5, 7, 4, classification=False)
    f = ACTIVATIONS[activation]

    def last_hidden(xn):
        a = xn
        for l, (W, b) in enumerate(net[:-1], start=1):
            h = f(a @ W.T + b)
            a = a + h if residual and l > 1 else h
        return a

    J = vmap(jacrev(last_hidden))(x)  # (k, 9, 7)
    torch.testing.assert_close(instruments.input_jacobian(weights, biases, activation, x, residual), J)
    sv2 = torch.linalg.svd(J).S ** 2  # (k, 7); JJᵀ (9 × 9) adds two zeros per input
    eig = torch.cat([sv2, torch.zeros(5, 2, dtype=F64)], dim=1)
    m1, var = eig.mean(1), eig.var(1, unbiased=False)
    spectrum = instruments.jacobian_spectrum(weights, biases, activation, x, residual)
    torch.testing.assert_close(spectrum.sv2_mean, m1.mean(), rtol=1e-10, atol=0)
    torch.testing.assert_close(spectrum.sv2_var, var.mean(), rtol=1e-10, atol=0)
    torch.testing.assert_close(spectrum.sv2_nvar, (var / m1**2).mean(), rtol=1e-10, atol=0)
    torch.testing.assert_close(spectrum.sv_max, sv2.max().sqrt(), rtol=1e-10, atol=0)
    pooled = sv2.numpy().ravel()  # the σ² of every input (JJᵀ's extra zeros left out)
    for q, key in [(5, "p05"), (50, "p50"), (95, "p95")]:
        expected = np.percentile(pooled, q)
        assert spectrum.metrics()[f"jacobian/sv2_{key}"].item() == pytest.approx(expected, rel=1e-10)
    assert set(spectrum.metrics()) == {
        "jacobian/sv2_mean",
        "jacobian/sv2_var",
        "jacobian/sv2_nvar",
        "jacobian/sv_max",
        "jacobian/sv2_p05",
        "jacobian/sv2_p50",
        "jacobian/sv2_p95",
    }


def test_jacobian_spectrum_with_a_member_dimension_equals_member_by_member():
    nets = [make_net([6, 6, 6, 2], seed=s) for s in (0, 1)]
    x, _ = data(3, 6, 2, classification=False)
    W = [torch.stack([net[l][0] for net in nets]) for l in range(3)]
    b = [torch.stack([net[l][1] for net in nets]) for l in range(3)]
    xs = torch.stack([x, 2 * x])  # each member its own inputs
    stacked = instruments.jacobian_spectrum(W, b, Activation.tanh, xs)
    for i, net in enumerate(nets):
        alone = instruments.jacobian_spectrum(
            [w for w, _ in net], [c for _, c in net], Activation.tanh, xs[i]
        )
        for field in ("sv2_mean", "sv2_var", "sv2_nvar", "sv_max", "sv2_percentiles"):
            torch.testing.assert_close(getattr(stacked, field)[i], getattr(alone, field), rtol=1e-12, atol=0)


# -------------------------------------------------------------------------------------------- sharpness
def flat_loss(net, x, y):
    """The training loss as a function of one flat parameter vector (for the dense Hessian)."""
    shapes = [t.shape for pair in net for t in pair]

    def loss(theta):
        parts, i = [], 0
        for s in shapes:
            parts.append(theta[i : i + s.numel()].reshape(s))
            i += s.numel()
        params = list(zip(parts[::2], parts[1::2], strict=True))
        return example_loss(forward(params, x)[0], y, False)

    return loss, torch.cat([t.flatten() for pair in net for t in pair])


def test_top_hessian_eigenvalue_matches_the_dense_hessian():
    net = make_net([3, 5, 4, 2], seed=7)
    x, y = data(16, 3, 2, classification=False)
    loss, theta = flat_loss(net, x, y)
    top = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, theta))[-1]
    params = [t.clone().requires_grad_() for pair in net for t in pair]
    pairs = lambda: list(zip(params[::2], params[1::2], strict=True))  # noqa: E731

    def batch_loss():
        return example_loss(forward(pairs(), x)[0], y, False)

    found = instruments.top_hessian_eigenvalue(batch_loss, params, iters=40)
    torch.testing.assert_close(found.top, top, rtol=1e-9, atol=0)
    assert all(p.grad is None for p in params)
    # warm start: from the previous eigenvector a couple of products suffice
    again = instruments.top_hessian_eigenvalue(batch_loss, params, iters=2, start=found.vector)
    torch.testing.assert_close(again.top, top, rtol=1e-9, atol=0)
    cold = instruments.top_hessian_eigenvalue(batch_loss, params, iters=2)
    assert abs(cold.top - top) > 1e-6 * abs(top)  # the cold start needs more products: the warm start counts


def test_top_hessian_eigenvalue_per_member():
    nets = [make_net([3, 5, 2], seed=s) for s in (8, 9)]
    x, y = data(12, 3, 2, classification=False)
    stacked = [torch.stack([net[l][i] for net in nets]).requires_grad_() for l in range(2) for i in range(2)]

    def summed_loss():
        a = x.expand(2, -1, -1)
        z = torch.tanh(a @ stacked[0].mT + stacked[1].unsqueeze(1))
        out = z @ stacked[2].mT + stacked[3].unsqueeze(1)  # (2, batch, 2)
        return ((out - y) ** 2).mean((1, 2)).sum()

    found = instruments.top_hessian_eigenvalue(summed_loss, stacked, iters=30, members=True)
    assert found.top.shape == (2,)
    for i, net in enumerate(nets):
        loss, theta = flat_loss(net, x, y)
        top = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, theta))[-1]
        torch.testing.assert_close(found.top[i], top, rtol=1e-9, atol=0)


@pytest.mark.parametrize("activation", list(Activation))
@pytest.mark.parametrize(("loss", "classification"), [("mse", False), ("cross_entropy", True), ("mse", True)])
def test_hessian_vector_product_by_hand_matches_double_backward(activation, loss, classification):
    """backprop.hessian_vector_product (the R-operator on the seed's equations) against autograd's double
    backward in float64, with a residual path so that every term of the recursion is exercised."""
    torch.manual_seed(0)
    cfg = ModelConfig(depth=3, width=6, activation=activation, residual=True, bias_std=0.1)
    model = build_mlp(cfg, 4, 3).double()
    x, y = data(7, 4, 3, classification)
    params = list(model.parameters())
    v = [torch.randn_like(p) for p in params]
    grads = torch.autograd.grad(
        loss_value(model(x), y, classification, Loss(loss)), params, create_graph=True
    )
    expected = torch.autograd.grad(grads, params, grad_outputs=v)
    mine = hessian_vector_product(model, curvature(model, x, y, classification, Loss(loss)), v)
    for got, want in zip(mine, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)


def test_a_net_that_overflows_gives_nan_not_an_error():
    """A diverging run is an outcome: the Jacobian spectrum and sharpness of a non-finite net are NaN."""
    weights = [torch.full((4, 4), 1e200, dtype=F64)] * 3 + [torch.ones(2, 4, dtype=F64)]  # J overflows
    biases = [torch.zeros(4, dtype=F64)] * 3 + [torch.zeros(2, dtype=F64)]
    x = torch.ones(3, 4, dtype=F64)
    spectrum = instruments.jacobian_spectrum(weights, biases, Activation.identity, x)
    assert all(math.isnan(float(v)) for v in spectrum.metrics().values())
    p = torch.tensor([1e300, 1.0], dtype=F64, requires_grad=True)
    found = instruments.top_hessian_eigenvalue(lambda: (p**4).sum() * 1e300, [p], iters=3)
    assert math.isnan(float(found.top)) and torch.isfinite(found.vector[0]).all()
