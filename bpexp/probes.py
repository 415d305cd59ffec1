"""Per-layer telemetry read between backward and the optimizer step, and the diagnosis it supports.

Cost: on a probe step, a handful of batched kernels (``torch._foreach_norm`` over all layers at once, one
stacked reduction over the hidden activations), one copy of the weights for the update ratio, and one
host sync for everything. Off the probe interval: nothing. All norms are float64, because float32
squares underflow to an exact 0 below ~1e-19, which deep badly-initialized nets reach.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Container
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from bpexp import instruments
from bpexp.backprop import DERIVATIVES, curvature, hessian_vector_product, loss_value
from bpexp.config import Activation, Loss, ProbesConfig
from bpexp.isometry import predict_jacobian
from bpexp.model import MLP
from bpexp.names import TINY, Diagnosis, Metric, Quantity, layer_key, profile, split_key

if TYPE_CHECKING:
    import pandas as pd

F64 = torch.float64

# Units whose f'(z) < 0.05·max f' count as saturated; f' is read off the output a = f(z).
SATURATION_DERIVATIVE = {
    Activation.sigmoid: lambda a: a * (1 - a) / 0.25,
    Activation.tanh: lambda a: 1 - a * a,
    Activation.softplus: lambda a: -torch.expm1(-a),  # f' = sigmoid(z) = 1 - e^{-softplus(z)}
}
# ReLU's f' is 0 below 0: a unit at 0 on the whole batch passes no gradient, it is dead.
DEAD_FAMILY = {Activation.relu}
# f(z) <= 0 exactly when z <= 0, but f' > 0 there (or nearly so): such units still learn; their share at
# or below 0 on the whole batch is logged as `nonpositive`, and no diagnosis reads it.
NONPOSITIVE_FAMILY = {Activation.leaky_relu, Activation.elu, Activation.selu, Activation.gelu}

# Diagnosis thresholds (read at one probe step).
DECADES = 2.0  # |log10(‖δ^(1)‖/‖δ^(L)‖)| above this: the error signal vanishes/explodes by >100×
SATURATED_SHARE = 0.5  # mean share of saturated units over hidden layers
DEAD_SHARE = 0.5  # share of dead units in the worst hidden layer


class Probes:
    """Reads one MLP's per-layer signals; `read` after backward, `collect` after the optimizer step."""

    def __init__(self, model: MLP, every: int, enabled: bool = True):
        self.model = model
        self.every = every
        self.enabled = enabled
        self.weights = [linear.weight for linear in model.linears]
        self.biases = [linear.bias for linear in model.linears]
        self.pending: dict[str, torch.Tensor] = {}
        self.scalars: dict[str, torch.Tensor] = {}
        self.before: list[torch.Tensor] = []

    def due(self, step: int) -> bool:
        """A probe step of the loop (the trained net gets one more probe after the last step)."""
        return self.enabled and step % self.every == 0

    @torch.no_grad()
    def read(
        self, delta: list[torch.Tensor], activations: list[torch.Tensor], scalars: dict[str, torch.Tensor]
    ) -> None:
        """Gradients, δ^(l), weights and activations a^(l) (each (batch, width_l)) as device tensors.

        Call between backward and clipping; also snapshots W for the update ratio. `activations` are
        f(z^(l)) of the hidden layers before dropout, then the output a^(L) = z^(L). `scalars` (e.g. the
        batch loss) ride along to the same host sync under their own keys.
        """
        self.scalars = {key: value.detach().to(F64).reshape(1) for key, value in scalars.items()}
        self.pending = {}
        grad_w = [w.grad if w.grad is not None else torch.zeros_like(w) for w in self.weights]
        grad_b = [b.grad if b.grad is not None else torch.zeros_like(b) for b in self.biases]
        p = self.pending
        p |= {
            Quantity.grad_norm: norms(grad_w),
            Quantity.grad_norm_b: norms(grad_b),
            Quantity.delta_norm: norms(delta),
            Quantity.weight_norm: norms(self.weights),
        }
        p.update(self.activation_stats(activations))
        self.before = [w.detach().clone() for w in self.weights]

    @torch.no_grad()
    def read_noise(self, noise: instruments.GradientNoise, smoothed: torch.Tensor) -> None:
        """Per-example gradient statistics, taken in the same host sync as the rest (call after read)."""
        per_layer, scalars = noise_columns(noise, smoothed)
        self.pending |= per_layer
        self.scalars |= {key: value.reshape(1) for key, value in scalars.items()}

    def activation_stats(self, activations: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Mean, spread, saturation and dead share of a^(1) … a^(L) over the batch."""
        model = self.model
        std, mean = torch.std_mean(activations[-1].detach().to(F64))
        stats = {Quantity.act_mean: mean.reshape(1), Quantity.act_std: std.reshape(1)}
        if len(activations) == 1:
            return stats
        hidden = torch.stack(activations[:-1]).to(F64)  # (L-1, batch, width): one reduction for all layers
        std, mean = torch.std_mean(hidden, dim=(1, 2))
        stats[Quantity.act_mean] = torch.cat([mean, stats[Quantity.act_mean]])
        stats[Quantity.act_std] = torch.cat([std, stats[Quantity.act_std]])
        stats.update(unit_shares(model.activation, hidden, batch_dim=1))
        return stats

    @torch.no_grad()
    def collect(self, stepped: bool) -> dict[str, float]:
        """Everything read, plus ‖ΔW‖/‖W‖ if the optimizer stepped, as floats: the one host sync."""
        p = self.pending
        if stepped:
            update = norms(torch._foreach_sub([w.detach() for w in self.weights], self.before))
            p[Quantity.update_ratio] = update / p[Quantity.weight_norm].clamp_min(TINY)
        p.update(self.scalars)
        values = torch.cat(list(p.values())).cpu().numpy()  # one sync per probe step
        metrics = row_metrics(values, [(name, len(t)) for name, t in p.items()], self.scalars)
        self.pending, self.scalars, self.before = {}, {}, []
        return metrics


def unit_shares(activation: Activation, hidden: torch.Tensor, batch_dim: int) -> dict[str, torch.Tensor]:
    """Per hidden layer: the share of saturated units (tanh/sigmoid family), and the share of units at
    or below 0 on the whole batch (`dead` for relu, `nonpositive` for its smooth cousins, which still
    pass gradient there). hidden: (…, L-1, batch, width) with the batch at `batch_dim`."""
    stats = {}
    if activation in SATURATION_DERIVATIVE:
        derivative = SATURATION_DERIVATIVE[activation](hidden)
        stats[Quantity.saturation] = (derivative < 0.05).to(F64).mean((batch_dim, batch_dim + 1))
    if activation in DEAD_FAMILY or activation in NONPOSITIVE_FAMILY:
        name = Quantity.dead if activation in DEAD_FAMILY else Quantity.nonpositive
        stats[name] = (hidden <= 0).all(dim=batch_dim).to(F64).mean(batch_dim)
    return stats


def row_metrics(row: np.ndarray, widths: list[tuple[str, int]], scalars: Container[str]) -> dict[str, float]:
    """One net's probe as metrics: `row` holds each quantity's values (`widths`: name, count) in order;
    scalars keep their key, per-layer quantities become `quantity/lNNN`; then the δ and ∂L/∂W profiles
    and the global gradient norm."""
    metrics: dict[str, float] = {}
    chunks: dict[str, np.ndarray] = {}
    offset = 0
    for name, n in widths:
        chunks[name] = chunk = row[offset : offset + n]
        offset += n
        if name in scalars:
            metrics[name] = float(chunk[0])
        else:
            metrics.update(zip(layer_keys(name, n), chunk.tolist(), strict=True))
    metrics[Metric.delta_ratio], metrics[Metric.delta_slope] = profile(chunks[Quantity.delta_norm])
    metrics[Metric.grad_ratio], metrics[Metric.grad_slope] = profile(chunks[Quantity.grad_norm])
    squares = np.sum(chunks[Quantity.grad_norm] ** 2) + np.sum(chunks[Quantity.grad_norm_b] ** 2)
    metrics[Metric.grad_norm_total] = float(np.sqrt(squares))
    return metrics


@functools.cache
def layer_keys(quantity: str, n: int) -> tuple[str, ...]:
    """`quantity/l001` … for n layers, built once."""
    return tuple(layer_key(quantity, l) for l in range(1, n + 1))


def norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Frobenius norms of a list of tensors, in float64, in one batched call."""
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=F64))


def values_of(metrics: dict[str, float], quantity: str) -> np.ndarray:
    return np.array([v for k, v in metrics.items() if split_key(k)[0] == quantity])


def diagnose(metrics: dict[str, float]) -> Diagnosis:
    """One word for one probe step, read from δ first (docs/design.md says why not ∂L/∂W alone).

    In order: unprobed, no δ was measured (probes off); exploding, δ grows by more than DECADES from
    the output layer to the first; dead_units (ReLU only), the worst hidden layer has > DEAD_SHARE of
    its units at 0 on the whole batch (a dead layer also cuts δ, so the cause is named before its
    effect); vanishing, δ shrinks by more than DECADES; saturated, on average > SATURATED_SHARE of
    hidden units sit where f' < 5% of its maximum; else healthy.
    """
    if Metric.delta_ratio not in metrics:
        return Diagnosis.unprobed
    ratio = metrics[Metric.delta_ratio]
    if not math.isfinite(ratio) or ratio > DECADES:
        return Diagnosis.exploding
    dead = values_of(metrics, Quantity.dead)
    if dead.size and dead.max() > DEAD_SHARE:
        return Diagnosis.dead_units
    if ratio < -DECADES:
        return Diagnosis.vanishing
    saturation = values_of(metrics, Quantity.saturation)
    if saturation.size and saturation.mean() > SATURATED_SHARE:
        return Diagnosis.saturated
    return Diagnosis.healthy


class Dynamics:
    """Every probe at full resolution, kept for the run's `dynamics.parquet` (long format)."""

    def __init__(self) -> None:
        self.records: list[tuple[int, dict[str, float]]] = []

    def add(self, step: int, metrics: dict[str, float]) -> None:
        self.records.append((step, metrics))

    def frame(self) -> pd.DataFrame:
        """Columns step, layer (nullable: network-level quantities have none), quantity, value."""
        import pandas as pd  # at the end only: half a second of start-up otherwise

        split = {key: split_key(key) for _, metrics in self.records for key in metrics}
        rows = [
            (step, *split[key], value) for step, metrics in self.records for key, value in metrics.items()
        ]
        steps, quantities, layers, values = zip(*rows, strict=True) if rows else ((), (), (), ())
        return pd.DataFrame(
            {
                "step": pd.array(steps, dtype="int64"),
                "layer": pd.array(layers, dtype="Int64"),
                "quantity": pd.array(quantities, dtype="string"),
                "value": pd.array(values, dtype="float64"),
            }
        )

    def write(self, path: Path) -> Path:
        self.frame().to_parquet(path, index=False)
        return path


# Probes beyond norms (instruments.py): gradient noise, the Jacobian's spectrum, sharpness.
JACOBIAN_INPUTS = 8  # the first training inputs: the same ones at every step, so a series compares
NOISE_DECAY = 0.9  # of gns/smoothed's moving averages, per probe step


class Instruments:
    """Which of instruments.py's probes one lone net gets, on which examples, and their state between
    steps (the noise scale's moving averages, sharpness's warm start). Off with probes.enabled=false."""

    def __init__(self, model: MLP, cfg: ProbesConfig, loss: Loss, x_train: torch.Tensor, seed: int):
        self.model, self.cfg, self.loss = model, cfg, loss
        enabled = cfg.enabled
        self.why_not_noise = noise_unsupported(model)
        self.noise = enabled and cfg.noise and self.why_not_noise is None
        plain = jacobian_unsupported(model) is None
        self.jacobian_every = cfg.jacobian_every if enabled and plain else None
        self.sharpness_every = cfg.sharpness_every if enabled else None
        self.jacobian_x = x_train[:JACOBIAN_INPUTS]
        self.generator = torch.Generator(device=x_train.device).manual_seed(seed + 2)  # probe batches
        self.smoothed = instruments.NoiseScaleEMA(NOISE_DECAY)
        self.theory: dict[str, float] = {}  # theory/jacobian_*, logged beside the spectrum at step 0
        self.eigenvector: list[torch.Tensor] | None = None

    def jacobian_due(self, step: int) -> bool:
        every = self.jacobian_every
        return every is not None and (step == 0 or (every > 0 and step % every == 0))

    def sharpness_due(self, step: int) -> bool:
        return self.sharpness_every is not None and step % self.sharpness_every == 0

    def noise_examples(self, x_train: torch.Tensor, y_train: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """probes.noise_batch's examples: None = the step's minibatch, 0 = all, N = N drawn for this probe."""
        n = self.cfg.noise_batch
        return None if n is None else noise_batch(n, x_train, y_train, self.generator)

    def gradient_noise(
        self, delta: list[torch.Tensor], inputs: list[torch.Tensor]
    ) -> tuple[instruments.GradientNoise, torch.Tensor]:
        """The per-example statistics of δ^(l) and a^(l-1), and gns/smoothed with this probe in it."""
        noise = instruments.gradient_noise(delta, inputs)
        total = noise.total()
        return noise, self.smoothed.update(total["trace_sigma"], total["grad_sq"])

    def jacobian(self, step: int) -> dict[str, float]:
        """jacobian/* of J = ∂a^(L-1)/∂x at the first training inputs (float64); the theory's twins
        beside them at step 0."""
        m = self.model
        weights = [linear.weight.detach() for linear in m.linears]
        biases = [linear.bias.detach() for linear in m.linears]
        spectrum = instruments.jacobian_spectrum(weights, biases, m.activation, self.jacobian_x, m.residual)
        measured = {key: float(value) for key, value in spectrum.metrics().items()}
        return {**measured, **self.theory} if step == 0 else measured

    def sharpness(
        self, x: torch.Tensor, y: torch.Tensor, classification: bool, lr: float
    ) -> dict[str, float]:
        """sharpness/top on (x, y), warm-started from the last eigenvector, and 2/η of the next step.

        The net's own state is left as it was: dropout's masks come from a forked RNG, batch norm's
        running statistics are put back."""
        m, params = self.model, list(self.model.parameters())
        if by_hand(m):  # the R-operator on the seed's equations: no graph, about 2/3 of autograd's cost
            c = curvature(m, x, y, classification, self.loss)
            product = functools.partial(hessian_vector_product, m, c)
            found = instruments.top_hessian_eigenvalue(
                None, params, self.cfg.sharpness_iters, start=self.eigenvector, product=product
            )
        else:  # normalization or dropout: autograd's double backward, the net's own state put back
            buffers = [b.clone() for b in m.buffers()]
            with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
                found = instruments.top_hessian_eigenvalue(
                    lambda: loss_value(m(x), y, classification, self.loss),
                    params,
                    self.cfg.sharpness_iters,
                    start=self.eigenvector,
                )
            with torch.no_grad():
                for b, saved in zip(m.buffers(), buffers, strict=True):
                    b.copy_(saved)
        self.eigenvector = [v.detach() for v in found.vector]
        return {Metric.sharpness_top: float(found.top), Metric.sharpness_two_over_lr: 2.0 / lr}


def noise_columns(
    noise: instruments.GradientNoise, smoothed: torch.Tensor
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One probe's gradient noise as the probes' columns: per layer (…, L) and scalars (…), leading
    dimensions (a population's members) kept."""
    total = noise.total()
    per_layer = {
        Quantity.grad_noise: noise.trace_sigma,
        Quantity.gns: noise.noise_scale,
        Quantity.gsnr: noise.gsnr,
    }
    scalars = {
        Metric.grad_noise_total: total["trace_sigma"],
        Metric.gns_total: total["noise_scale"],
        Metric.gsnr_total: total["gsnr"],
        Metric.gns_smoothed: smoothed,
    }
    return per_layer, scalars


def noise_batch(
    n: int, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """probes.noise_batch = n's examples: all of them for 0 (or n ≥ their number), else n drawn."""
    if n == 0 or n >= len(x):
        return x, y
    index = torch.randperm(len(x), generator=generator, device=x.device)[:n]
    return x[index], y[index]


def by_hand(model: MLP) -> bool:
    """Whether backprop.hessian_vector_product covers the net: Linear -> f (+ residual), no dropout."""
    plain = all(isinstance(norm, torch.nn.Identity) for norm in model.norms)
    return plain and not isinstance(model.dropout, torch.nn.Dropout) and model.activation in DERIVATIVES


def noise_unsupported(model: MLP) -> str | None:
    """Why per-example gradients cannot be read off δ for this net, or None when they can."""
    if any(isinstance(norm, torch.nn.BatchNorm1d) for norm in model.norms):
        return (
            "model.norm=batchnorm: an example's gradient depends on the whole batch, so the examples' "
            "gradients are not independent draws and grad_noise/, gns/ and gsnr/ are not recorded"
        )
    return None


def jacobian_unsupported(model: MLP) -> str | None:
    """Why the Jacobian spectrum is not taken (instruments.input_jacobian's nets only), or None."""
    if model.n_layers < 2:
        return "no hidden layer"
    if any(not isinstance(norm, torch.nn.Identity) for norm in model.norms):
        return "normalization layers"
    return None


def jacobian_theory(model_cfg, in_dim: int, out_dim: int, x_train: torch.Tensor) -> dict[str, float]:
    """theory/jacobian_* at initialization, for the inputs' mean square (empty where none applies)."""
    prediction = predict_jacobian(model_cfg, in_dim, out_dim, float(x_train.pow(2).mean()))
    return prediction.metrics() if prediction else {}


def layer_signals(
    model: MLP, x: torch.Tensor, y: torch.Tensor, classification: bool, loss: Loss
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """δ^(l) of the mean loss over (x, y) and the layer inputs a^(l-1), by one forward and one backward
    that touch no .grad; dropout's masks come from a forked RNG, so the run's stream does not move."""
    inputs: list[torch.Tensor] = []
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []), torch.enable_grad():
        out, zs, _ = model.trace(x, inputs)
        delta = torch.autograd.grad(loss_value(out, y, classification, loss), zs)
    return list(delta), inputs
