"""Instruments beyond norms: gradient noise, the input-output Jacobian's spectrum, and sharpness.

Pure torch functions on tensors a probe step already holds (δ^(l), the layer inputs a^(l-1), the weights),
so they cost a few extra kernels rather than extra backward passes. Every function accepts an optional
leading member dimension (a population of M nets trained as stacked tensors): shapes (batch, n) or
(M, batch, n) for per-example tensors, (out, in) or (M, out, in) for weights; results keep that leading
dimension. All statistics are float64 (float32 squares underflow, see probes.py).

* Gradient noise (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training"; Liu et al. 2020,
  "Understanding Why Neural Networks Generalize Well Through GSNR of Parameters"): the per-example
  gradient of a Linear layer is rank one, g_n = B·δ_n ã_nᵀ with ã_n = [a_n, 1] (the 1 carries the bias),
  because the probes' δ = ∂L/∂z is that of the MEAN loss L = (1/B) Σ_n ℓ_n. So without materializing any
  per-example gradient: ‖g_n‖² = B²‖δ_n‖²‖ã_n‖², and Σ_n g_n² per parameter = B²(δ²)ᵀ(ã²).
  Valid only when examples are independent given the weights: never with batchnorm.
* Jacobian spectrum (Pennington, Schoenholz & Ganguli 2017): J = ∂a^(L-1)/∂x = D_{L-1}W_{L-1} … D_1W_1,
  D_l = diag f'(z^(l)), readout left out; its squared singular values, input by input.
* Sharpness (Cohen et al. 2021): the top eigenvalue of the loss Hessian by Lanczos on Hessian-vector
  products (double backward), warm-started from the previous top eigenvector.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from bpexp.backprop import DERIVATIVES
from bpexp.config import Activation
from bpexp.model import ACTIVATIONS
from bpexp.names import Metric, Quantity, layer_key

F64 = torch.float64


# ------------------------------------------------------------------------------------------ gradient noise
@dataclass
class GradientNoise:
    """Per-layer gradient statistics over one batch of B examples; each field (..., L) (per layer l = 1 … L,
    leading member dims kept). Sum the extensive ones over layers for the net; see ``total``."""

    trace_sigma: Tensor
    """tr Σ: the per-example gradient variance summed over the layer's parameters (unbiased, 1/(B−1))."""
    grad_sq: Tensor
    """|G|² estimated without bias: ‖Ḡ‖² − tr Σ/B, since E‖Ḡ‖² = |G|² + tr Σ/B (Ḡ: the batch's gradient)."""
    gsnr_sum: Tensor
    """Σ_p Ḡ_p²/s_p² over the layer's parameters with s_p² > 0 (GSNR per parameter, Liu et al. 2020)."""
    gsnr_count: Tensor
    """How many parameters entered gsnr_sum (parameters no example moves, e.g. of dead units, do not)."""
    batch: int

    @property
    def noise_scale(self) -> Tensor:
        """B_simple = tr Σ / |G|² per layer (McCandlish et al. 2018, eq. 2.8); may be < 0 or huge when |G|²
        is small against tr Σ/B (late in training): smooth numerator and denominator (NoiseScaleEMA)."""
        return self.trace_sigma / self.grad_sq

    @property
    def gsnr(self) -> Tensor:
        """The mean GSNR over the layer's parameters."""
        return self.gsnr_sum / self.gsnr_count

    def total(self) -> dict[str, Tensor]:
        """The net as one parameter vector: tr Σ, |G|², B_simple and mean GSNR, each (...,)."""
        trace, g2 = self.trace_sigma.sum(-1), self.grad_sq.sum(-1)
        return {
            "trace_sigma": trace,
            "grad_sq": g2,
            "noise_scale": trace / g2,
            "gsnr": self.gsnr_sum.sum(-1) / self.gsnr_count.sum(-1),
        }

    def metrics(self) -> dict[str, Tensor]:
        """MLflow keys grad_noise/lNNN, gns/lNNN, gsnr/lNNN and their /total, as (...,) tensors."""
        out: dict[str, Tensor] = {}
        for name, per_layer in (
            (Quantity.grad_noise, self.trace_sigma),
            (Quantity.gns, self.noise_scale),
            (Quantity.gsnr, self.gsnr),
        ):
            for l in range(per_layer.shape[-1]):
                out[layer_key(name, l + 1)] = per_layer[..., l]
        total = self.total()
        out[Metric.grad_noise_total] = total["trace_sigma"]
        out[Metric.gns_total] = total["noise_scale"]
        out[Metric.gsnr_total] = total["gsnr"]
        return out


def with_ones(a: Tensor) -> Tensor:
    """ã = [a, 1]: the bias is the weight of a constant input, so one formula covers W and b."""
    return torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)


@torch.no_grad()
def gradient_noise(delta: Sequence[Tensor], inputs: Sequence[Tensor]) -> GradientNoise:
    """Per-example gradient statistics of every Linear layer from δ^(l) = ∂L/∂z^(l) of the mean loss
    (..., B, n_l) and its input a^(l-1) (..., B, n_{l-1}) (after dropout, as the layer saw it), l = 1 … L.

    Per parameter p, with g_n = B·δ_n ã_nᵀ: Ḡ = δᵀã (the batch gradient), Σ_n g_n² = B²(δ²)ᵀ(ã²) and
    s_p² = (Σ_n g_n,p² − B Ḡ_p²)/(B − 1). Cost per layer: two (n_l × B) @ (B × n_{l-1}) products."""
    batch = delta[0].shape[-2]
    if batch < 2:
        raise ValueError(f"gradient noise needs a batch of at least 2 examples, got {batch}")
    trace, g2, gsnr_sum, gsnr_count = [], [], [], []
    for d, a in zip(delta, inputs, strict=True):
        d, a = d.to(F64), with_ones(a.to(F64))  # (..., B, n_l), (..., B, n_{l-1} + 1)
        mean = d.mT @ a  # Ḡ, (..., n_l, n_{l-1} + 1)
        second = batch**2 * ((d * d).mT @ (a * a))  # Σ_n g_n² per parameter
        var = (second - batch * mean * mean).clamp_min(0) / (batch - 1)  # s_p², rounding can dip below 0
        trace_sigma = var.sum((-2, -1))
        trace.append(trace_sigma)
        g2.append((mean * mean).sum((-2, -1)) - trace_sigma / batch)
        moved = var > 0
        ratio = torch.where(moved, mean * mean / torch.where(moved, var, 1.0), 0.0)
        gsnr_sum.append(ratio.sum((-2, -1)))
        gsnr_count.append(moved.sum((-2, -1)).to(F64))
    stack = lambda xs: torch.stack(xs, dim=-1)  # noqa: E731 - (..., L)
    return GradientNoise(stack(trace), stack(g2), stack(gsnr_sum), stack(gsnr_count), batch)


class NoiseScaleEMA:
    """B_simple smoothed as McCandlish et al. recommend (appendix A.1): exponential moving averages of tr Σ
    and of |G|² kept separately, their ratio taken last, since a ratio of noisy estimates is biased and
    |G|²'s unbiased estimate can be negative. Bias-corrected as Adam's moments, so the first value is the
    first estimate itself. Works on tensors of any shape (per layer, per member)."""

    def __init__(self, decay: float = 0.9):
        if not 0 <= decay < 1:
            raise ValueError(f"NoiseScaleEMA decay={decay!r} is not in [0, 1)")
        self.decay, self.steps = decay, 0
        self.trace: Tensor | float = 0.0
        self.grad_sq: Tensor | float = 0.0

    def update(self, trace_sigma: Tensor, grad_sq: Tensor) -> Tensor:
        """Add one estimate; return the smoothed noise scale."""
        b = self.decay
        self.steps += 1
        self.trace = b * self.trace + (1 - b) * trace_sigma
        self.grad_sq = b * self.grad_sq + (1 - b) * grad_sq
        correction = 1 - b**self.steps  # the same for both: cancels in the ratio, kept for the parts
        return (self.trace / correction) / (self.grad_sq / correction)


# -------------------------------------------------------------------------------------- Jacobian spectrum
# The spectrum's shape in the dynamics: percentiles of σ² over the inputs' σ² pooled (one row per quantity
# and step, so it charts as lines, on a log axis where the spectrum spans decades).
SV2_PERCENTILES = {
    Metric.jacobian_sv2_p05: 0.05,
    Metric.jacobian_sv2_p50: 0.50,
    Metric.jacobian_sv2_p95: 0.95,
}


@dataclass
class JacobianSpectrum:
    """The squared singular values σ² of J = ∂a^(L-1)/∂x at k inputs; fields (...,) (leading member dims)."""

    sv2_mean: Tensor
    """m1: the mean of σ², averaged over the inputs (theory: (σ_w² μ1)^(L-1))."""
    sv2_var: Tensor
    """m2 − m1²: the variance of σ² within one input's spectrum, averaged over the inputs."""
    sv2_nvar: Tensor
    """(m2 − m1²)/m1² per input, averaged: the scale-free spread (0 = dynamical isometry)."""
    sv_max: Tensor
    """The largest singular value over the inputs."""
    sv2_percentiles: Tensor
    """(..., len(SV2_PERCENTILES)): the 5th, 50th and 95th percentiles of σ² over all inputs' σ²."""

    def metrics(self) -> dict[str, Tensor]:
        return {
            Metric.jacobian_sv2_mean: self.sv2_mean,
            Metric.jacobian_sv2_var: self.sv2_var,
            Metric.jacobian_sv2_nvar: self.sv2_nvar,
            Metric.jacobian_sv_max: self.sv_max,
            **{key: self.sv2_percentiles[..., i] for i, key in enumerate(SV2_PERCENTILES)},
        }


def input_jacobian(
    weights: Sequence[Tensor],
    biases: Sequence[Tensor],
    activation: Activation,
    x: Tensor,
    residual: bool = False,
) -> Tensor:
    """J = ∂a^(L-1)/∂x for each input of x (..., k, n_0): (..., k, n_{L-1}, n_0), from the chain
    J^(l) = D_l W_l J^(l-1) (+ J^(l-1) on a residual path), D_l = diag f'(z^(l)), without autograd.
    weights/biases are those of all L Linear layers (W: (..., out, in)); the readout W^(L) is left out.
    Plain Linear -> f (+ residual) nets only: normalization and dropout have no place here."""
    f, f_prime = ACTIVATIONS[activation], DERIVATIVES[activation]
    a = x.unsqueeze(-2)  # (..., k, 1, n_0): one row per input
    jac = None
    for l, (W, b) in enumerate(zip(weights[:-1], biases[:-1], strict=True), start=1):
        W = W.unsqueeze(-3)  # (..., 1, out, in): the same weights for every input
        z = a @ W.mT + b.unsqueeze(-2).unsqueeze(-2)  # z^(l), (..., k, 1, out)
        d = f_prime(z).mT  # (..., k, out, 1)
        step = d * (W if jac is None else W @ jac)  # D_l W_l J^(l-1), (..., k, out, n_0)
        skip = residual and l > 1
        jac = jac + step if skip else step
        a = a + f(z) if skip else f(z)
    if jac is None:
        raise ValueError("the Jacobian to the last hidden layer needs at least one hidden layer (depth ≥ 1)")
    return jac


@torch.no_grad()
def jacobian_spectrum(
    weights: Sequence[Tensor],
    biases: Sequence[Tensor],
    activation: Activation,
    x: Tensor,
    residual: bool = False,
) -> JacobianSpectrum:
    """Statistics of the squared singular values of J at the inputs x (..., k, n_0), in float64.
    Cost: k·(L−1) products of n×n matrices and k SVDs of n_{L-1} × n_0."""
    weights = [w.to(F64) for w in weights]
    biases = [b.to(F64) for b in biases]
    jac = input_jacobian(weights, biases, activation, x.to(F64), residual)  # (..., k, n_{L-1}, n_0)
    finite = torch.isfinite(jac).all(-1).all(-1)  # (..., k): an overflowing chain gives NaN, not an error
    sv = torch.linalg.svdvals(torch.where(finite[..., None, None], jac, 0.0))  # (..., k, min(n_{L-1}, n_0))
    sv = torch.where(finite[..., None], sv, torch.nan)
    sv2 = sv * sv
    # JJᵀ is n_{L-1} × n_{L-1}: when n_0 < n_{L-1} its n_{L-1} − n_0 zeros count in m1 and m2, not in the
    # percentiles (which describe the nonzero σ² only).
    n = jac.shape[-2]
    m1 = sv2.sum(-1) / n  # (..., k)
    m2 = (sv2 * sv2).sum(-1) / n
    var = m2 - m1 * m1
    levels = torch.tensor(list(SV2_PERCENTILES.values()), dtype=F64, device=sv2.device)
    pooled = sv2.flatten(-2)  # (..., k·r); NaN stays NaN
    return JacobianSpectrum(
        sv2_mean=m1.mean(-1),
        sv2_var=var.mean(-1),
        sv2_nvar=(var / (m1 * m1)).mean(-1),
        sv_max=sv.amax((-2, -1)),
        sv2_percentiles=torch.quantile(pooled, levels, dim=-1).movedim(0, -1),
    )


# -------------------------------------------------------------------------------------------- sharpness
@dataclass
class Sharpness:
    top: Tensor
    """The largest eigenvalue λ_max of the loss Hessian: a scalar, or (M,) per member."""
    vector: list[Tensor]
    """Its unit eigenvector (Ritz vector), shaped like the parameters: the next call's warm start."""


def top_hessian_eigenvalue(
    loss_fn: Callable[[], Tensor] | None,
    params: Sequence[Tensor],
    iters: int = 20,
    start: Sequence[Tensor] | None = None,
    members: bool = False,
    product: Callable[[list[Tensor]], Sequence[Tensor]] | None = None,
) -> Sharpness:
    """λ_max of ∇²L by ``iters`` steps of Lanczos (one Hessian-vector product each, by double backward),
    with full reorthogonalization, started from ``start`` (the previous eigenvector) or a fixed random vector.

    Lanczos rather than power iteration: for the same HVPs its Ritz value converges much faster and goes to
    the algebraically largest eigenvalue, not the one of largest |λ| (negative curvature at init).
    members=True: parameters lead with a member dimension M and loss_fn returns the SUM of the members'
    losses, so the Hessian is block diagonal and each member gets its own Lanczos run, side by side.
    Vectors live flat, (M, P), so reorthogonalization is two matrix products per iteration.
    Gradients are taken with torch.autograd.grad: no parameter's .grad is touched. `product`: a
    Hessian-vector product of its own (e.g. backprop.hessian_vector_product), used instead of autograd's."""
    params = list(params)
    lead = params[0].shape[0] if members else 1

    def flat(tensors: Sequence[Tensor]) -> Tensor:  # (M, P)
        return torch.cat([t.reshape(lead, -1) for t in tensors], dim=1)

    def unflat(v: Tensor) -> list[Tensor]:  # views shaped like the parameters
        sizes = [p.numel() // lead for p in params]
        return [t.reshape(p.shape) for t, p in zip(v.split(sizes, dim=1), params, strict=True)]

    if product is not None:
        hvp = lambda v: flat(product(unflat(v)))  # noqa: E731
    else:
        assert loss_fn is not None, "top_hessian_eigenvalue needs loss_fn or product"
        with torch.enable_grad():
            grads = torch.autograd.grad(loss_fn(), params, create_graph=True)

        def hvp(v: Tensor) -> Tensor:
            return flat(torch.autograd.grad(grads, params, grad_outputs=unflat(v), retain_graph=True))

    if start is None:
        generator = torch.Generator(device=params[0].device).manual_seed(0)
        start = [torch.randn(p.shape, generator=generator, dtype=p.dtype, device=p.device) for p in params]
    with torch.no_grad():
        v = flat(start).detach()
        Q = v.new_zeros(lead, iters, v.shape[1])  # the Lanczos basis q_1 … q_k, filled row by row
        Q[:, 0] = v / torch.linalg.vector_norm(v, dim=1, keepdim=True)
        alphas, betas = [], []
        for i in range(iters):
            w = hvp(Q[:, i])
            alphas.append((w * Q[:, i]).sum(1))
            basis = Q[:, : i + 1]  # (M, k, P)
            w = w - ((basis @ w.unsqueeze(-1)).mT @ basis).squeeze(1)  # full reorthogonalization
            beta = torch.linalg.vector_norm(w, dim=1)  # (M,)
            if i == iters - 1 or bool((beta <= 1e-12 * alphas[-1].abs().clamp_min(1e-30)).all()):
                break  # the last product, or an invariant subspace: T holds the exact eigenvalues
            betas.append(beta)
            Q[:, i + 1] = w / beta.unsqueeze(1)
        k = len(alphas)
        T = torch.diag_embed(torch.stack(alphas, -1))  # (M, k, k), tridiagonal
        if betas:
            off = torch.diag_embed(torch.stack(betas, -1), offset=1)
            T = T + off + off.mT
        bad = ~torch.isfinite(T).all(-1).all(-1)  # (M,): a non-finite net gets NaN, not an error
        evals, evecs = torch.linalg.eigh(torch.where(bad[:, None, None], 0.0, T))
        ritz = (evecs[..., -1].unsqueeze(1) @ Q[:, :k]).squeeze(1)  # (M, P)
        ritz = ritz / torch.linalg.vector_norm(ritz, dim=1, keepdim=True)
        ritz = torch.where(bad[:, None], Q[:, 0], ritz)  # the next call starts where this one did
    top = torch.where(bad, torch.nan, evals[..., -1])
    return Sharpness(top=top if members else top[0], vector=unflat(ritz))
