"""A population: M nets of one shape trained as one batched computation, each member exactly a lone run.

Over 400 lines: the stacked net (forward, both backward engines), the per-member optimizers and the
batched probes must each agree with their lone-run twin value for value, and are read side by side.

Weights are stacked, W^(l) as (M, out, in) and b^(l) as (M, out); a layer is one ``torch.baddbmm`` over
(M, batch, in). Every member is built as a lone run builds its net (``build_mlp`` after
``torch.manual_seed(seed)``), gets its own data split, minibatch order and dropout masks (a generator per
member, holding the global RNG state a lone run has after its init), its own batch-norm statistics and its
own optimizer coefficients. Members never mix: the population's loss is the sum of the members' losses,
so autograd gives each member ∂L_m/∂θ_m. A member whose loss goes non-finite is frozen and recorded as a
lone run records it; the rest train on. Probes read every member in the same batched calls, with one host
sync per probe step for the whole population.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from bpexp import instruments
from bpexp.backprop import DERIVATIVES, check_supported, gradcheck, mse_targets, resolve_loss
from bpexp.config import Config, Engine, Loss, Norm, OptimName, flatten
from bpexp.data import Dataset, make_data
from bpexp.model import ACTIVATIONS, MLP, build_mlp, first_nonfinite_layer
from bpexp.names import TINY, Diagnosis, Metric, Outcome, Quantity
from bpexp.optim import build_schedule
from bpexp.probes import (
    F64,
    JACOBIAN_INPUTS,
    NOISE_DECAY,
    Dynamics,
    diagnose,
    jacobian_theory,
    jacobian_unsupported,
    noise_batch,
    noise_columns,
    noise_unsupported,
    row_metrics,
    unit_shares,
)
from bpexp.result import RunResult
from bpexp.theory import Prediction, predict
from bpexp.train import minibatch_indices, resolve_device, run_name

# What members of one population may differ in: numbers and seeds. Everything else is the shape and
# the step plan they share (and tracking.* / sweep.*, which say where a run is recorded, not what it is).
MEMBER_KEYS = (
    "seed",
    "model.init",
    "model.init_std",
    "model.init_gain",
    "model.bias_std",
    "model.dropout",
    "optim.lr",
    "optim.weight_decay",
    "optim.clip_norm",
    "optim.momentum",
    "optim.betas",
)
NOT_SHARED = ("tracking.", "sweep.")
log = logging.getLogger("bpexp.population")
# torch's defaults for the coefficients bpexp's configs do not set (optim.py builds with these).
ADAM_EPS, RMSPROP_ALPHA, RMSPROP_EPS, ADAGRAD_EPS = 1e-8, 0.99, 1e-8, 1e-10
BATCHNORM_MOMENTUM, NORM_EPS = 0.1, 1e-5
JACOBIAN_CHUNK = 16  # members whose input-output Jacobians are taken at once


def group_key(cfg: Config) -> str:
    """Configs with equal keys can train as one population: the shared part of the config, as text."""
    flat = flatten(cfg)
    shared = {k: v for k, v in flat.items() if k not in MEMBER_KEYS and not k.startswith(NOT_SHARED)}
    return repr(sorted(shared.items()))


@dataclass
class Member:
    """One member's own state: what a lone run keeps in its locals."""

    cfg: Config
    data: Dataset
    generator: torch.Generator  # dropout masks, drawn as the lone run draws them from the global RNG
    prediction: Prediction | None  # theory.py's, logged as the lone run logs it
    result: RunResult = field(default_factory=RunResult)
    dynamics: Dynamics = field(default_factory=Dynamics)
    losses: dict[int, float] = field(default_factory=dict)  # since the last probe
    active: bool = True

    def record(self, metrics: dict[str, float], step: int) -> None:
        self.dynamics.add(step, metrics)
        self.result.metrics.update(metrics)


@dataclass
class Pass:
    """One forward and backward pass of the population; delta and activations on probe steps only."""

    loss: torch.Tensor  # (M,)
    out: torch.Tensor  # (M, batch, out_dim)
    delta: list[torch.Tensor]  # δ^(l), (M, batch, width_l)
    activations: list[torch.Tensor]  # f(z^(l)) before dropout, then a^(L), (M, batch, width_l)
    inputs: list[torch.Tensor] = field(default_factory=list)  # a^(l-1) after dropout (probes.noise)


class Population:
    """M members' stacked parameters, optimizer state and randomness; `train()` runs the lone loop."""

    def __init__(self, cfgs: list[Config]):
        if len({group_key(cfg) for cfg in cfgs}) != 1:
            raise ValueError("a population's configs must share their group_key (shape and step plan)")
        self.cfg = cfg = cfgs[0]
        torch.set_num_threads(cfg.train.threads)
        self.device = resolve_device(cfg.device)
        self.dtype = getattr(torch, cfg.train.dtype.value)
        self.members: list[Member] = []
        nets: list[MLP] = []
        for member_cfg in cfgs:
            torch.manual_seed(member_cfg.seed)  # as train() does, in its order: data, net, then the loop
            data = make_data(member_cfg.data, member_cfg.seed).to(self.device, self.dtype)
            net = build_mlp(member_cfg.model, data.in_dim, data.out_dim).to(self.device, self.dtype)
            generator = torch.Generator(device=self.device)
            generator.set_state(torch.get_rng_state() if self.device.type == "cpu" else cuda_state())
            prediction = predict(
                member_cfg.model, data.in_dim, data.out_dim, float(data.x_train.pow(2).mean())
            )
            member = Member(member_cfg, data, generator, prediction)
            member.result.name = run_name(member_cfg)
            self.members.append(member)
            nets.append(net)
        if cfg.train.engine == Engine.manual or cfg.probes.gradcheck_every:
            check_supported(nets[0])  # the hand-written backward has no normalization layers
        self.template = nets[0]  # shapes, activation and residual, shared by all
        self.f = ACTIVATIONS[cfg.model.activation]
        self.n_layers = nets[0].n_layers
        self.M = len(cfgs)
        self.stack(nets)
        self.dropout = [m.cfg.model.dropout for m in self.members]
        self.classification = self.members[0].data.classification
        self.loss_kind = resolve_loss(cfg.train.loss, self.classification)
        self.x_val = torch.stack([m.data.x_val for m in self.members])
        self.y_val = torch.stack([m.data.y_val for m in self.members])
        self.x_train = torch.stack([m.data.x_train for m in self.members])  # (M, n, in): one gather a step
        self.y_train = torch.stack([m.data.y_train for m in self.members])
        seeds = [m.cfg.seed for m in self.members]
        self.batch_rows = minibatch_indices(len(self.x_train[0]), cfg.train.batch_size, seeds, self.device)
        self.row_offsets = torch.arange(self.M, device=self.device)[:, None] * self.x_train.shape[1]
        self.optimizer = PopulationOptimizer(
            self.parameters(), [m.cfg for m in self.members], cfg.train.steps
        )
        self.probes = PopulationProbes(self)
        self.instruments = PopulationInstruments(self)

    def stack(self, nets: list[MLP]) -> None:
        """Stacked leaves (M, …): W^(l), b^(l), then the norms' γ, β and batch-norm running statistics."""

        def leaf(tensors: list[torch.Tensor]) -> torch.Tensor:
            return torch.stack([t.detach() for t in tensors]).requires_grad_(True)

        self.weights = [leaf([n.linears[l].weight for n in nets]) for l in range(self.n_layers)]
        self.biases = [leaf([n.linears[l].bias for n in nets]) for l in range(self.n_layers)]
        self.norm = self.cfg.model.norm
        depth = self.n_layers - 1
        if self.norm == Norm.none:
            self.gammas, self.betas, self.running = [], [], []
            return
        self.gammas = [leaf([n.norms[l].weight for n in nets]) for l in range(depth)]
        self.betas = [leaf([n.norms[l].bias for n in nets]) for l in range(depth)]
        if self.norm == Norm.batchnorm:
            self.running = [
                (
                    torch.stack([n.norms[l].running_mean for n in nets]),
                    torch.stack([n.norms[l].running_var for n in nets]),
                )
                for l in range(depth)
            ]
        else:
            self.running = []

    def parameters(self) -> list[torch.Tensor]:
        """In a lone MLP's order: linears (W, b), then norms (γ, β)."""
        linear = [p for pair in zip(self.weights, self.biases, strict=True) for p in pair]
        return linear + [p for pair in zip(self.gammas, self.betas, strict=True) for p in pair]

    # ------------------------------------------------------------------------------------ the lone net
    @torch.no_grad()
    def member_mlp(self, m: int) -> MLP:
        """Member m as a lone MLP (a copy): for first_nonfinite_layer, gradcheck and the tests."""
        cfg = self.members[m].cfg
        net = MLP(self.template.linears[0].in_features, self.template.linears[-1].out_features, cfg.model)
        net = net.to(self.device, self.dtype)
        for l, linear in enumerate(net.linears):
            linear.weight.copy_(self.weights[l][m])
            linear.bias.copy_(self.biases[l][m])
        for l, norm in enumerate(net.norms[: len(self.gammas)]):
            norm.weight.copy_(self.gammas[l][m])
            norm.bias.copy_(self.betas[l][m])
            if self.running:
                norm.running_mean.copy_(self.running[l][0][m])
                norm.running_var.copy_(self.running[l][1][m])
        return net

    def layer_inputs(
        self, x: torch.Tensor, hidden: list[torch.Tensor], masks: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """a^(0) … a^(L-1) as the layers saw them (after dropout), from forward's f(·) and masks."""
        a = [x]
        for l, h in enumerate(hidden):
            h = h * masks[l] if masks else h
            a.append(a[l] + h if self.cfg.model.residual and l > 0 else h)
        return a

    # ---------------------------------------------------------------------------------------- forward
    def normalize(self, z: torch.Tensor, l: int, training: bool) -> torch.Tensor:
        """Batch norm (statistics per member over its batch) or layer norm, with each member's γ, β."""
        if self.norm == Norm.none:
            return z
        gamma, beta = self.gammas[l].unsqueeze(1), self.betas[l].unsqueeze(1)  # (M, 1, width)
        if self.norm == Norm.layernorm:
            return F.layer_norm(z, z.shape[-1:], eps=NORM_EPS) * gamma + beta
        running_mean, running_var = self.running[l]
        if training:
            var, mean = torch.var_mean(z, dim=1, correction=0)  # (M, width)
            with torch.no_grad():
                n = z.shape[1]
                running_mean.mul_(1 - BATCHNORM_MOMENTUM).add_(BATCHNORM_MOMENTUM * mean)
                running_var.mul_(1 - BATCHNORM_MOMENTUM).add_(BATCHNORM_MOMENTUM * var * (n / (n - 1)))
        else:
            mean, var = running_mean, running_var
        invstd = torch.rsqrt(var + NORM_EPS).unsqueeze(1)
        return (z - mean.unsqueeze(1)) * invstd * gamma + beta

    def masks(self, shape: tuple[int, int], engine: Engine) -> list[torch.Tensor] | None:
        """Each member's inverted-dropout mask for one hidden layer, drawn from its own generator exactly
        as its lone run draws it (F.dropout: bernoulli_(1-p); backprop.dropout_masks: bernoulli(full))."""
        if not any(self.dropout):
            return None
        masks = []
        for member, p in zip(self.members, self.dropout, strict=True):
            if p == 0:
                masks.append(torch.ones(shape, dtype=self.dtype, device=self.device))
            elif engine == Engine.manual:
                full = torch.full(shape, 1 - p, dtype=self.dtype, device=self.device)
                masks.append(torch.bernoulli(full, generator=member.generator) / (1 - p))
            else:
                noise = torch.empty(shape, dtype=self.dtype, device=self.device)
                masks.append(noise.bernoulli_(1 - p, generator=member.generator).div_(1 - p))
        return masks

    def forward(
        self, x: torch.Tensor, training: bool = True, keep: bool = False, engine: Engine = Engine.autograd
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """a^(L) for every member, x (M, batch, in); keep: also z^(l) (grads retained) and f(z^(l)).

        Returns (out, z, hidden activations before dropout, masks). The manual engine draws all masks
        first, as backprop.forward does; autograd draws each when its layer runs, as nn.Dropout does."""
        L, batch = self.n_layers, x.shape[1]
        shapes = [(batch, w.shape[1]) for w in self.weights[:-1]]
        drawn = [self.masks(s, engine) for s in shapes] if training and engine == Engine.manual else []
        zs, hs, used = [], [], []
        a = x
        for l in range(L):
            z = torch.baddbmm(self.biases[l].unsqueeze(1), a, self.weights[l].transpose(1, 2))
            if keep:
                zs.append(z)
                if z.requires_grad:
                    z.retain_grad()
            if l == L - 1:
                return z, zs, hs, used
            h = self.f(self.normalize(z, l, training))
            if keep:
                hs.append(h.detach())
            if training:
                masks = drawn[l] if drawn else self.masks(shapes[l], engine)
                if masks is not None:
                    mask = torch.stack(masks)
                    used.append(mask)
                    h = h * mask
            a = a + h if self.cfg.model.residual and l > 0 else h
        raise AssertionError("unreachable: an MLP has at least one layer")

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Each member's loss, (M,): cross-entropy or MSE, means over its own batch as train.loss_fn."""
        if self.loss_kind == Loss.cross_entropy:
            per_example = F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none")
            return per_example.view(out.shape[:2]).mean(1)
        return (out - mse_targets(y, out, self.classification)).pow(2).mean((1, 2))

    def accuracy(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        if not self.classification:
            return None
        return (out.argmax(-1) == y).to(F64).mean(1)

    # --------------------------------------------------------------------------------------- backward
    def backprop_pass(self, x: torch.Tensor, y: torch.Tensor, probing: bool) -> Pass:
        """Fill every stacked .grad with each member's ∂L_m/∂θ_m, by autograd or by hand."""
        if self.cfg.train.engine == Engine.manual:
            return self.manual_pass(x, y, probing)
        out, z, hidden, masks = self.forward(x, keep=probing)
        loss = self.loss(out, y)
        loss.sum().backward()  # members are independent: ∂(Σ L_m)/∂θ_m = ∂L_m/∂θ_m
        if not probing:
            return Pass(loss.detach(), out.detach(), [], [])
        inputs = self.layer_inputs(x, hidden, masks) if self.instruments.noise else []
        return Pass(loss.detach(), out.detach(), [z_l.grad for z_l in z], [*hidden, out.detach()], inputs)

    @torch.no_grad()
    def manual_pass(self, x: torch.Tensor, y: torch.Tensor, probing: bool) -> Pass:
        """backprop.py's equations with a leading member dimension: δ^(l) = g^(l) ⊙ m^(l) ⊙ f'(z^(l)),
        g^(l-1) = δ^(l) W^(l) (+ g^(l) on a residual path), ∂L/∂W^(l) = δ^(l)ᵀ a^(l-1),
        ∂L/∂b^(l) = Σ δ^(l)."""
        f_prime = DERIVATIVES[self.cfg.model.activation]
        L, residual = self.n_layers, self.cfg.model.residual
        out, z, _, masks = self.forward(x, keep=True, engine=Engine.manual)
        a = [x]  # a^(0) … a^(L-1), rebuilt from z and the masks as backprop.forward does
        for l in range(L - 1):
            h = self.f(z[l]) * masks[l] if masks else self.f(z[l])
            a.append(a[l] + h if residual and l > 0 else h)
        batch, out_dim = out.shape[1:]
        if self.loss_kind == Loss.cross_entropy:
            d = (torch.softmax(out, dim=-1) - F.one_hot(y, out_dim).to(out.dtype)) / batch
        else:
            d = 2 * (out - mse_targets(y, out, self.classification)) / (batch * out_dim)
        delta = [d]
        g = torch.bmm(d, self.weights[L - 1])
        for l in range(L - 1, 0, -1):
            m = masks[l - 1] if masks else 1.0
            d = g * m * f_prime(z[l - 1])
            delta.insert(0, d)
            if l > 1:
                g = torch.bmm(d, self.weights[l - 1]) + (g if residual and 2 <= l < L else 0)
        for l, (d, a_prev) in enumerate(zip(delta, a, strict=True)):
            self.weights[l].grad = torch.bmm(d.transpose(1, 2), a_prev)
            self.biases[l].grad = d.sum(1)
        hidden = [self.f(z_l) for z_l in z[:-1]] if probing else []
        return Pass(self.loss(out, y), out, delta, [*hidden, out], a)

    # ------------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self) -> list[dict[str, float]]:
        """Each member's validation loss (and accuracy), with dropout off and running statistics."""
        if self.x_val.shape[1] == 0:
            return [{} for _ in self.members]
        out, *_ = self.forward(self.x_val, training=False)
        columns = {Metric.val_loss: self.loss(out, self.y_val)}
        if (acc := self.accuracy(out, self.y_val)) is not None:
            columns[Metric.val_acc] = acc
        values = torch.stack([c.to(F64) for c in columns.values()], 1).cpu().tolist()  # one sync
        return [dict(zip(columns, row, strict=True)) for row in values]

    def next_batches(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every member's next minibatch, the rows its lone run draws, gathered in one indexing."""
        rows = next(self.batch_rows)
        if rows is None:
            return self.x_train, self.y_train
        flat = (rows + self.row_offsets).flatten()  # into the members' training sets laid end to end
        x, y = (t.flatten(0, 1).index_select(0, flat) for t in (self.x_train, self.y_train))
        return x.view(*rows.shape, *x.shape[1:]), y.view(*rows.shape, *y.shape[1:])

    # ------------------------------------------------------------------------------------------- loop
    def train(self) -> list[RunResult]:
        """train()'s loop for every member at once; each member's RunResult and Dynamics as a lone run's."""
        cfg, members = self.cfg, self.members
        steps, probes = cfg.train.steps, self.probes
        start = time.perf_counter()
        for step in range(steps + 1):  # the last pass only probes the trained nets
            last = step == steps
            if step % cfg.train.eval_every == 0 or last:
                for member, metrics in zip(members, self.evaluate(), strict=True):
                    if member.active:
                        member.record(metrics, step)
            probing = probes.due(step, steps)
            if last and not probing:
                break
            x, y = self.next_batches()
            step_pass = self.backprop_pass(x, y, probing)
            losses = step_pass.loss.cpu().tolist()  # one host sync per step for the population
            for m, (member, loss) in enumerate(zip(members, losses, strict=True)):
                if not member.active:
                    continue
                if not math.isfinite(loss):
                    for at, value in member.losses.items():  # the climb to divergence
                        member.record({Metric.train_loss: value}, at)
                    self.diverge(m, step, x[m])
                else:
                    member.losses[step] = loss
            if probing:
                probes.read(step_pass, y)
                self.instruments.read_noise(step_pass)
            del step_pass  # its δ and activations, held into the next step's pass, were the peak memory
            if cfg.probes.gradcheck_every and step % cfg.probes.gradcheck_every == 0:
                for m, member in enumerate(members):
                    if member.active:
                        net = self.member_mlp(m)
                        error = gradcheck(net, x[m], y[m], self.classification)
                        member.record({Metric.gradcheck: error}, step)
            self.instruments.record(step, x, y)
            if not last:
                self.optimizer.step(self.active_mask())
                for member in members:
                    member.result.steps += member.active
            if probing:
                for m, metrics in enumerate(probes.collect(stepped=not last)):
                    member = members[m]
                    if not member.active:
                        continue
                    member.losses.clear()
                    if step == 0:
                        member.result.initial, member.result.diagnosis_init = metrics, diagnose(metrics)
                        metrics = {**metrics, **(member.prediction.metrics() if member.prediction else {})}
                    member.record(metrics, step)
                    if not math.isfinite(metrics[Metric.grad_norm_total]):
                        self.diverge(m, step, x[m])
            for p in self.parameters():
                p.grad = None
            if not any(member.active for member in members):
                break
        seconds = time.perf_counter() - start
        for member in members:
            result = member.result
            result.loop_seconds = result.seconds = seconds  # the population's, shared by its members
            ended = result.outcome == Outcome.diverged
            result.diagnosis = Diagnosis.diverged if ended else diagnose(result.metrics)
        return [member.result for member in members]

    def active_mask(self) -> torch.Tensor:
        return torch.tensor([m.active for m in self.members], device=self.device)

    def diverge(self, m: int, step: int, x: torch.Tensor) -> None:
        """Freeze member m and record its divergence as train.diverged does, on its lone net."""
        member = self.members[m]
        member.active = False
        result = member.result
        result.outcome, result.diverged_step = Outcome.diverged, step
        result.diverged_layer = first_nonfinite_layer(self.member_mlp(m), x)


def cuda_state() -> torch.Tensor:
    return torch.cuda.get_rng_state()


class PopulationOptimizer:
    """torch's single-tensor update rules over stacked parameters, each member with its own lr, weight
    decay, momentum, betas and clipping norm; the schedule's factor is common (the same plan).

    The formulas follow torch.optim's `_single_tensor_*` functions line by line (what torch runs on CPU),
    so a member's parameters equal its lone run's to rounding."""

    def __init__(self, params: list[torch.Tensor], cfgs: list[Config], steps: int):
        self.params = params
        first = cfgs[0].optim
        self.kind = first.name
        device, dtype = params[0].device, params[0].dtype

        def per_member(values: list[float]) -> torch.Tensor:  # float64 scalars, as Python computes them
            return torch.tensor(values, dtype=F64, device=device)

        self.lr = per_member([c.optim.lr for c in cfgs])
        self.weight_decay = per_member([c.optim.weight_decay for c in cfgs])
        self.momentum = per_member([c.optim.momentum for c in cfgs])
        self.beta1 = per_member([c.optim.betas[0] for c in cfgs])
        self.beta2 = per_member([c.optim.betas[1] for c in cfgs])
        clip = [c.optim.clip_norm for c in cfgs]
        self.clip = per_member([math.inf if c is None else c for c in clip]) if any(clip) else None
        self.decays = bool(self.weight_decay.any())
        self.dtype = dtype
        self.t = 0
        self.state: list[dict[str, torch.Tensor]] = [{} for _ in params]
        # The schedule's factor, read off torch's own scheduler on a one-parameter optimizer at lr = 1.
        self.unit = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        self.schedule = build_schedule(first.schedule, self.unit, steps)

    def coefficients(self, lr: torch.Tensor) -> dict[int, dict[str, torch.Tensor]]:
        """This step's per-member coefficients, each (M,) in float64 as Python computes torch's scalars,
        converted once to the parameters' dtype and shaped (M, 1, …) for each parameter rank."""
        values = {"lr": lr, "wd": self.weight_decay, "momentum": self.momentum}
        if self.decays:
            values["lr_wd"] = lr * self.weight_decay
        if self.kind in (OptimName.adam, OptimName.adamw):
            values["1-beta1"], values["beta2"], values["1-beta2"] = 1 - self.beta1, self.beta2, 1 - self.beta2
            values["step_size"] = lr / (1 - self.beta1**self.t)
            values["bias_correction2_sqrt"] = (1 - self.beta2**self.t) ** 0.5
        columns = torch.stack(list(values.values())).to(self.dtype)  # (k, M): one conversion a step
        return {
            rank: dict(zip(values, columns.view(len(values), -1, *[1] * (rank - 1)), strict=True))
            for rank in {p.dim() for p in self.params}
        }

    @torch.no_grad()
    def clip_gradients(self) -> None:
        """clip_grad_norm_ per member: each scaled by clip/(its global norm + 1e-6), at most 1."""
        grads = [p.grad for p in self.params]
        per_tensor = [torch.linalg.vector_norm(g, dim=tuple(range(1, g.dim()))) for g in grads]
        total = torch.linalg.vector_norm(torch.stack(per_tensor, 1), dim=1)  # (M,)
        scale = (self.clip.to(total.dtype) / (total + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(scale.view(-1, *[1] * (g.dim() - 1)))

    @torch.no_grad()
    def step(self, active: torch.Tensor) -> None:
        if self.clip is not None:
            self.clip_gradients()
        self.t += 1
        coefficients = self.coefficients(self.lr * self.unit.param_groups[0]["lr"])
        frozen = not bool(active.all())
        for p, state in zip(self.params, self.state, strict=True):
            before = p.detach().clone() if frozen else None
            self.update(p, p.grad, state, coefficients[p.dim()])
            if before is not None:  # a frozen member keeps its parameters: its run ended there
                p.copy_(torch.where(active.view(-1, *[1] * (p.dim() - 1)), p, before))
        self.unit.step()  # no gradient: moves nothing, keeps the scheduler's order check quiet
        self.schedule.step()

    def update(self, p: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor], c: dict):
        """One parameter's update, c: this step's coefficients at its rank (see `coefficients`)."""
        kind = self.kind
        if kind == OptimName.adamw:
            if self.decays:
                p.mul_(1 - c["lr_wd"])
        elif self.decays:
            grad = grad + c["wd"] * p
        match kind:
            case OptimName.sgd:
                p.sub_(c["lr"] * grad)
            case OptimName.momentum | OptimName.nesterov:
                momentum = c["momentum"]
                if "buf" not in state:
                    buf = state["buf"] = grad.clone()
                else:
                    buf = state["buf"].mul_(momentum).add_(grad)
                grad = grad + momentum * buf if kind == OptimName.nesterov else buf
                p.sub_(c["lr"] * grad)
            case OptimName.adam | OptimName.adamw:
                if "exp_avg" not in state:
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                state["exp_avg"].lerp_(grad, c["1-beta1"])
                state["exp_avg_sq"].mul_(c["beta2"]).add_(c["1-beta2"] * grad * grad)
                denom = (state["exp_avg_sq"].sqrt() / c["bias_correction2_sqrt"]).add_(ADAM_EPS)
                p.sub_(c["step_size"] * (state["exp_avg"] / denom))
            case OptimName.rmsprop:
                square_avg = state.setdefault("square_avg", torch.zeros_like(p))
                square_avg.mul_(RMSPROP_ALPHA).addcmul_(grad, grad, value=1 - RMSPROP_ALPHA)
                p.sub_(c["lr"] * (grad / square_avg.sqrt().add_(RMSPROP_EPS)))
            case OptimName.adagrad:
                total = state.setdefault("sum", torch.zeros_like(p))
                total.addcmul_(grad, grad, value=1)
                p.sub_(c["lr"] * (grad / total.sqrt().add_(ADAGRAD_EPS)))


class PopulationProbes:
    """probes.Probes for every member at once: the same quantities, in batched calls, and one host sync
    per probe step; `collect` gives each member exactly the metric dict its lone run's probes give."""

    def __init__(self, population: Population):
        self.population = population
        cfg = population.cfg
        self.every, self.enabled = cfg.probes.every, cfg.probes.enabled
        self.activation = cfg.model.activation
        self.pending: dict[str, torch.Tensor] = {}  # quantity -> (M, layers) float64
        self.scalars: dict[str, torch.Tensor] = {}  # (M,) each: the batch loss and accuracy
        self.before: list[torch.Tensor] = []

    def due(self, step: int, last_step: int) -> bool:
        return self.enabled and (step % self.every == 0 or step == last_step)

    @torch.no_grad()
    def read(self, step_pass: Pass, y: torch.Tensor) -> None:
        """Between backward and clipping, as Probes.read: norms of ∂L/∂W, ∂L/∂b, δ, W; activations."""
        pop = self.population
        p = self.pending = {
            Quantity.grad_norm: stacked_norms([w.grad for w in pop.weights]),
            Quantity.grad_norm_b: stacked_norms([b.grad for b in pop.biases]),
            Quantity.delta_norm: stacked_norms(step_pass.delta),
            Quantity.weight_norm: stacked_norms(pop.weights),
        }
        p.update(self.activation_stats(step_pass.activations))
        scalars = {Metric.train_loss: step_pass.loss.to(F64)}
        if (acc := pop.accuracy(step_pass.out, y)) is not None:
            scalars[Metric.train_acc] = acc
        self.scalars = scalars
        self.before = [w.detach().clone() for w in pop.weights]

    def activation_stats(self, activations: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Probes.activation_stats layer by layer: one layer of every member in float64 at a time."""
        per_layer = [torch.std_mean(a.to(F64), dim=(1, 2)) for a in activations]  # (std, mean) (M,) each
        stats = {
            Quantity.act_mean: torch.stack([mean for _, mean in per_layer], 1),
            Quantity.act_std: torch.stack([std for std, _ in per_layer], 1),
        }
        shares = [unit_shares(self.activation, h.to(F64).unsqueeze(1), batch_dim=2) for h in activations[:-1]]
        for name in shares[0] if shares else ():
            stats[name] = torch.cat([layer[name] for layer in shares], 1)  # (M, L-1)
        return stats

    @torch.no_grad()
    def collect(self, stepped: bool) -> list[dict[str, float]]:
        """Every member's metrics, as Probes.collect gives them, from one host sync."""
        pop, p = self.population, self.pending
        if stepped:
            update = stacked_norms(torch._foreach_sub([w.detach() for w in pop.weights], self.before))
            p[Quantity.update_ratio] = update / p[Quantity.weight_norm].clamp_min(TINY)
        for name, value in self.scalars.items():
            p[name] = value.unsqueeze(1)
        values = torch.cat(list(p.values()), 1).cpu().numpy()  # (M, columns): one sync per probe step
        widths = [(name, tensor.shape[1]) for name, tensor in p.items()]
        members = [row_metrics(row, widths, self.scalars) for row in values]
        self.pending, self.scalars, self.before = {}, {}, []
        return members


def stacked_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Frobenius norm of each member's slice of each tensor, in float64: (M, len(tensors))."""
    return torch.stack(
        [torch.linalg.vector_norm(t.detach(), dim=tuple(range(1, t.dim())), dtype=F64) for t in tensors], 1
    )


def train_population(cfgs: list[Config]) -> list[tuple[RunResult, Dynamics, Prediction | None]]:
    """Train the configs (one group_key) as one population: per member its RunResult, its Dynamics and
    the theory's prediction, as a lone run would have them."""
    population = Population(cfgs)
    results = population.train()
    return [(r, m.dynamics, m.prediction) for r, m in zip(results, population.members, strict=True)]


class PopulationInstruments:
    """probes.Instruments for every member at once, each value equal to its lone run's: gradient noise
    with a member dimension (one einsum-like product per layer), the Jacobian of every member in one
    batched chain, and sharpness by one batched Hessian-vector product per Lanczos step (the Hessian of
    the members' summed loss is block diagonal), normalized per member."""

    def __init__(self, population: Population):
        self.population = pop = population
        cfg, template = pop.cfg.probes, pop.template
        self.cfg = cfg
        why_not = noise_unsupported(template)
        self.noise = cfg.enabled and cfg.noise and why_not is None
        if cfg.enabled and cfg.noise and why_not:
            log.warning("probes.noise: %s", why_not)  # once for the population, as once for a lone run
        plain = jacobian_unsupported(template) is None
        self.jacobian_every = cfg.jacobian_every if cfg.enabled and plain else None
        self.sharpness_every = cfg.sharpness_every if cfg.enabled else None
        members = pop.members
        self.generators = [
            torch.Generator(device=pop.device).manual_seed(m.cfg.seed + 2) for m in members
        ]  # probes.noise_batch's draws, one stream per member as in its lone run
        self.smoothed = instruments.NoiseScaleEMA(NOISE_DECAY)
        self.eigenvector: list[torch.Tensor] | None = None
        if self.jacobian_every is not None:
            self.jacobian_x = torch.stack([m.data.x_train[:JACOBIAN_INPUTS] for m in members])
            self.theory = [
                jacobian_theory(m.cfg.model, m.data.in_dim, m.data.out_dim, m.data.x_train) for m in members
            ]

    def read_noise(self, step_pass: Pass) -> None:
        """Per-example gradient statistics of every member, into the probes' one host sync."""
        if not self.noise:
            return
        pop = self.population
        if self.cfg.noise_batch is None:
            delta, inputs = step_pass.delta, step_pass.inputs
        else:
            delta, inputs = self.layer_signals(*self.noise_examples())
        noise = instruments.gradient_noise(delta, inputs)  # fields (M, L)
        total = noise.total()
        per_layer, scalars = noise_columns(
            noise, self.smoothed.update(total["trace_sigma"], total["grad_sq"])
        )
        pop.probes.pending |= per_layer
        pop.probes.scalars |= scalars

    def noise_examples(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each member's probes.noise_batch examples, drawn as its lone run draws them: (M, N, …)."""
        members = zip(self.population.members, self.generators, strict=True)
        picked = [noise_batch(self.cfg.noise_batch, m.data.x_train, m.data.y_train, g) for m, g in members]
        xs, ys = zip(*picked, strict=True)
        return torch.stack(xs), torch.stack(ys)

    def layer_signals(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """probes.layer_signals for every member: δ^(l) of each member's mean loss and a^(l-1), with
        dropout's masks drawn from each member's generator and its state put back (a forked RNG)."""
        pop = self.population
        with kept_state(pop), torch.enable_grad():
            out, z, hidden, masks = pop.forward(x, keep=True)
            delta = torch.autograd.grad(pop.loss(out, y).sum(), z)
        return list(delta), pop.layer_inputs(x, hidden, masks)

    def record(self, step: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """The Jacobian spectrum and the sharpness where due, recorded for each active member."""
        pop = self.population
        every = self.jacobian_every
        rows: list[dict[str, float]] = [{} for _ in pop.members]
        if every is not None and (step == 0 or (every > 0 and step % every == 0)):
            for row, values in zip(rows, self.jacobian(), strict=True):
                row |= values
            if step == 0:
                for row, theory in zip(rows, self.theory, strict=True):
                    row |= theory
            for member, row in zip(pop.members, rows, strict=True):
                if member.active:
                    member.record(row, step)
        if self.sharpness_every is not None and step % self.sharpness_every == 0:
            for member, row in zip(pop.members, self.sharpness(x, y), strict=True):
                if member.active:
                    member.record(row, step)

    def jacobian(self) -> list[dict[str, float]]:
        """Every member's spectrum, JACOBIAN_CHUNK members at a time: the float64 chains of a whole
        population would be its largest tensors."""
        pop, chunks = self.population, []
        for m in range(0, pop.M, JACOBIAN_CHUNK):
            members = slice(m, m + JACOBIAN_CHUNK)
            spectrum = instruments.jacobian_spectrum(
                [w.detach()[members] for w in pop.weights],
                [b.detach()[members] for b in pop.biases],
                pop.cfg.model.activation,
                self.jacobian_x[members],
                pop.cfg.model.residual,
            )
            metrics = spectrum.metrics()
            chunks.append(torch.stack(list(metrics.values()), 1))
        columns = torch.cat(chunks).cpu().tolist()  # (M, keys): one sync
        return [dict(zip(metrics, row, strict=True)) for row in columns]

    def sharpness(self, x: torch.Tensor, y: torch.Tensor) -> list[dict[str, float]]:
        """Every member's top Hessian eigenvalue on its own batch, from the same start as its lone run."""
        pop = self.population
        params = pop.parameters()
        start = self.eigenvector
        if start is None:  # the lone run's fixed random start, the same for every member
            generator = torch.Generator(device=pop.device).manual_seed(0)
            start = [
                torch.randn(p.shape[1:], generator=generator, dtype=p.dtype, device=p.device).expand_as(p)
                for p in params
            ]
        with kept_state(pop):
            found = instruments.top_hessian_eigenvalue(
                lambda: pop.loss(pop.forward(x)[0], y).sum(),
                params,
                self.cfg.sharpness_iters,
                start=start,
                members=True,
            )
        self.eigenvector = [v.detach() for v in found.vector]
        lr = pop.optimizer.lr * pop.optimizer.unit.param_groups[0]["lr"]  # η of each member's next step
        values = torch.stack([found.top.to(F64).cpu(), 2.0 / lr.cpu()], 1).tolist()
        return [
            {Metric.sharpness_top: top, Metric.sharpness_two_over_lr: two_over_lr}
            for top, two_over_lr in values
        ]


@contextmanager
def kept_state(pop: Population) -> Iterator[None]:
    """A side computation leaves the population as it was: the members' dropout generators and the
    batch-norm running statistics are put back afterwards."""
    states = [m.generator.get_state() for m in pop.members]
    running = [(mean.clone(), var.clone()) for mean, var in pop.running]
    try:
        yield
    finally:
        for member, state in zip(pop.members, states, strict=True):
            member.generator.set_state(state)
        with torch.no_grad():
            for (mean, var), (m0, v0) in zip(pop.running, running, strict=True):
                mean.copy_(m0)
                var.copy_(v0)
