"""Integration: the instruments inside a real run (composed config, the training loop), their logged values
against brute force on the run's own net: per-example gradients by torch.func, the Jacobian by jacrev and a
dense SVD, the top Hessian eigenvalue from the dense Hessian; and train.loss through both engines."""

from __future__ import annotations

import logging

import pandas as pd
import pytest
import torch
from conftest import make_config
from test_population import assert_same_run
from torch.func import functional_call, grad, jacrev, vmap

from bpexp.backprop import loss_value
from bpexp.config import ConfigError, Loss
from bpexp.data import make_data
from bpexp.isometry import predict_jacobian
from bpexp.model import build_mlp
from bpexp.names import split_key
from bpexp.train import train

F64 = torch.float64
SMALL = ["tracking=none", "train.dtype=float64", "model.depth=2", "model.width=8", "model.activation=tanh"]


def initial_net(cfg):
    """The run's net and data at initialization, drawn as train() draws them."""
    torch.manual_seed(cfg.seed)
    data = make_data(cfg.data, cfg.seed).to("cpu", F64)
    return build_mlp(cfg.model, data.in_dim, data.out_dim).to(F64), data


def at(frame: pd.DataFrame, key: str, step: int = 0) -> float:
    """The value of a metric key at one step of dynamics.parquet (long format: quantity, layer)."""
    quantity, layer = split_key(key)
    rows = frame[(frame.quantity == quantity) & (frame.step == step)]
    rows = rows[rows.layer.isna()] if layer is None else rows[rows.layer == layer]
    assert len(rows) == 1, f"{key} at step {step}: {len(rows)} rows"
    return float(rows.value.iloc[0])


def run(tmp_path, *overrides: str):
    cfg = make_config(*SMALL, *overrides)
    result = train(cfg, out_dir=tmp_path)
    return cfg, result, pd.read_parquet(tmp_path / "dynamics.parquet")


def per_example_gradients(net, x, y, classification, loss):
    """∇ℓ_n for every example, flattened per layer (W and b together): [(n, params of layer l)]."""
    params = {k: v.detach() for k, v in net.named_parameters()}

    targets = torch.nn.functional.one_hot(y, 10).to(F64) if loss == Loss.mse else y  # one_hot: not in vmap

    def example_loss(p, xn, tn):
        out = functional_call(net, p, (xn[None],))
        if loss == Loss.mse:
            return ((out - tn[None]) ** 2).mean()
        return loss_value(out, tn[None], classification, loss)

    g = vmap(grad(example_loss), in_dims=(None, 0, 0))(params, x, targets)
    return [torch.cat([g[f"linears.{l}.weight"].flatten(1), g[f"linears.{l}.bias"]], 1) for l in range(3)]


def brute_force(grads: torch.Tensor) -> tuple[float, float, float]:
    """tr Σ (unbiased), B_simple = tr Σ / (|Ḡ|² − tr Σ/B) and the mean GSNR of (B, P) per-example grads."""
    batch = len(grads)
    mean, var = grads.mean(0), grads.var(0)
    trace = var.sum()
    moved = var > 0
    return (
        float(trace),
        float(trace / (mean.pow(2).sum() - trace / batch)),
        float((mean[moved] ** 2 / var[moved]).mean()),
    )


# ------------------------------------------------------------------------------------------ gradient noise
@pytest.mark.parametrize(("loss", "engine"), [("cross_entropy", "autograd"), ("mse", "manual")])
def test_logged_gradient_noise_equals_per_example_gradients(tmp_path, loss, engine):
    """The step's own full batch: grad_noise/, gns/, gsnr/ per layer and in total, as torch.func sees them."""
    cfg, _, frame = run(
        tmp_path,
        "data=digits",
        "data.n_train=60",
        "data.n_val=10",
        "train.batch_size=null",
        "probes.noise=true",
        f"train.loss={loss}",
        f"train.engine={engine}",
    )
    net, data = initial_net(cfg)
    layers = per_example_gradients(net, data.x_train, data.y_train, True, Loss(loss))
    for l, grads in enumerate(layers, start=1):
        trace, scale, gsnr = brute_force(grads)
        assert at(frame, f"grad_noise/l{l:03d}") == pytest.approx(trace, rel=1e-9)
        assert at(frame, f"gns/l{l:03d}") == pytest.approx(scale, rel=1e-9)
        assert at(frame, f"gsnr/l{l:03d}") == pytest.approx(gsnr, rel=1e-9)
    trace, scale, gsnr = brute_force(torch.cat(layers, 1))
    assert at(frame, "grad_noise/total") == pytest.approx(trace, rel=1e-9)
    assert at(frame, "gns/total") == pytest.approx(scale, rel=1e-9)
    assert at(frame, "gsnr/total") == pytest.approx(gsnr, rel=1e-9)
    assert at(frame, "gns/smoothed") == pytest.approx(scale, rel=1e-9)  # the first value is the estimate
    assert set(frame[frame.quantity == "gns/total"].step) == {0, 2, 4, 6}


def test_noise_batch_draws_its_own_examples_and_moves_nothing_else(tmp_path):
    """probes.noise_batch=0 is the whole training set, whatever the minibatch; a drawn probe batch leaves
    the run's trajectory (minibatches, dropout masks) exactly as it was without the noise."""
    common = ["data=digits", "data.n_train=60", "data.n_val=10", "train.batch_size=16"]
    cfg, _, whole = run(tmp_path / "whole", *common, "probes.noise=true", "probes.noise_batch=0")
    net, data = initial_net(cfg)
    layers = per_example_gradients(net, data.x_train, data.y_train, True, Loss.cross_entropy)
    assert at(whole, "gns/total") == pytest.approx(brute_force(torch.cat(layers, 1))[1], rel=1e-9)
    common.append("model.dropout=0.1")
    _, _, drawn = run(tmp_path / "drawn", *common, "probes.noise=true", "probes.noise_batch=8")
    _, _, plain = run(tmp_path / "plain", *common)
    loss = lambda f: f[f.quantity == "train/loss"].value.tolist()  # noqa: E731
    assert loss(drawn) == loss(plain)
    assert set(drawn[drawn.quantity == "gns/total"].step) == {0, 2, 4, 6}
    assert "gns/total" not in set(plain.quantity)


def test_batchnorm_records_no_noise_and_says_why_once(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="bpexp.train"):
        _, _, frame = run(tmp_path, "data=blobs", "model.norm=batchnorm", "probes.noise=true")
    assert not frame.quantity.str.startswith(("grad_noise/", "gns/", "gsnr/")).any()
    warnings = [r.getMessage() for r in caplog.records if "probes.noise" in r.getMessage()]
    assert len(warnings) == 1 and "batchnorm" in warnings[0] and "not independent" in warnings[0]


# -------------------------------------------------------------------------------------- Jacobian spectrum
def test_logged_jacobian_spectrum_equals_jacrev_and_its_theory(tmp_path):
    cfg, _, frame = run(
        tmp_path,
        "data=gaussian",
        "data.in_dim=8",
        "model.width=8",
        "model.depth=3",
        "probes.jacobian_every=3",
    )
    net, data = initial_net(cfg)
    x = data.x_train[:8]

    def last_hidden(xn):  # a^(L-1): the readout left out
        a = xn
        for linear in net.linears[:-1]:
            a = torch.tanh(linear(a))
        return a

    sv2 = torch.linalg.svdvals(vmap(jacrev(last_hidden))(x)).detach() ** 2  # (8, 8)
    m1, m2 = sv2.mean(1), (sv2**2).mean(1)
    assert at(frame, "jacobian/sv2_mean") == pytest.approx(float(m1.mean()), rel=1e-10)
    assert at(frame, "jacobian/sv2_var") == pytest.approx(float((m2 - m1**2).mean()), rel=1e-10)
    assert at(frame, "jacobian/sv2_nvar") == pytest.approx(float(((m2 - m1**2) / m1**2).mean()), rel=1e-10)
    assert at(frame, "jacobian/sv_max") == pytest.approx(float(sv2.max().sqrt()), rel=1e-10)
    median = float(torch.quantile(sv2.flatten(), 0.5))
    assert at(frame, "jacobian/sv2_p50") == pytest.approx(median, rel=1e-10)
    theory = predict_jacobian(cfg.model, 8, data.out_dim, float(data.x_train.pow(2).mean()))
    assert at(frame, "theory/jacobian_sv2_mean") == pytest.approx(theory.sv2_mean, rel=1e-12)
    assert at(frame, "theory/jacobian_sv2_nvar") == pytest.approx(theory.sv2_nvar, rel=1e-12)
    assert sorted(frame[frame.quantity == "jacobian/sv2_nvar"].step) == [0, 3, 6]
    assert sorted(frame[frame.quantity == "theory/jacobian_sv2_nvar"].step) == [0]


# ---------------------------------------------------------------------------------------------- sharpness
def test_logged_sharpness_equals_the_dense_hessian_and_leaves_the_run_alone(tmp_path):
    common = ["data=teacher", "data.n_train=24", "data.n_val=8", "train.batch_size=null", "optim=sgd"]
    common += ["optim.lr=0.05", "model.width=4", "model.dropout=0.2"]
    cfg, _, frame = run(tmp_path / "s", *common, "probes.sharpness_every=3", "probes.sharpness_iters=60")
    net, data = initial_net(cfg)
    params = dict(net.named_parameters())
    names, shapes = list(params), [p.shape for p in params.values()]
    theta = torch.cat([p.detach().flatten() for p in params.values()])
    net.eval()  # the run with dropout draws its own masks: the dense Hessian is checked without dropout

    def flat_loss(t):
        chunks = t.split([s.numel() for s in shapes])
        parts = {n: c.view(s) for n, c, s in zip(names, chunks, shapes, strict=True)}
        return loss_value(functional_call(net, parts, (data.x_train,)), data.y_train, False)

    top = torch.linalg.eigvalsh(torch.autograd.functional.hessian(flat_loss, theta))[-1]
    _, _, eval_frame = run(
        tmp_path / "e", *common[:-1], "probes.sharpness_every=3", "probes.sharpness_iters=60"
    )
    assert at(eval_frame, "sharpness/top") == pytest.approx(float(top), rel=1e-9)
    assert at(frame, "sharpness/two_over_lr") == pytest.approx(2 / 0.05)
    assert sorted(frame[frame.quantity == "sharpness/top"].step) == [0, 3, 6]
    _, _, plain = run(tmp_path / "p", *common)  # dropout's masks and the parameters: untouched
    loss = lambda f: f[f.quantity == "train/loss"].value.tolist()  # noqa: E731
    assert loss(frame) == loss(plain)


# --------------------------------------------------------------------------------------------- train.loss
def test_train_loss_mse_on_classes_through_both_engines(tmp_path):
    common = ["data=digits", "data.n_train=40", "data.n_val=10", "train.batch_size=null", "train.loss=mse"]
    cfg, _, auto = run(tmp_path / "a", *common)
    _, _, manual = run(tmp_path / "m", *common, "train.engine=manual")
    net, data = initial_net(cfg)
    onehot = torch.nn.functional.one_hot(data.y_train, 10).to(F64)
    assert at(auto, "train/loss") == pytest.approx(
        float(((net(data.x_train) - onehot) ** 2).mean()), rel=1e-12
    )
    pd.testing.assert_series_equal(
        auto.value.reset_index(drop=True), manual.value.reset_index(drop=True), rtol=1e-9
    )


def test_cross_entropy_on_regression_data_fails_naming_the_key():
    with pytest.raises(ConfigError, match=r"train\.loss=cross_entropy"):
        train(make_config("tracking=none", "data=teacher", "train.loss=cross_entropy"))


# ----------------------------------------------------------------------------------------- populations
@pytest.mark.parametrize("engine", ["autograd", "manual"])
def test_population_members_carry_the_instruments_of_their_lone_runs(engine, tmp_path):
    """Every instrument of a member equals its lone run's to 1e-9 in float64: noise on the step's batch and
    on a drawn one, the Jacobian with its theory, sharpness with dropout's masks and 2/η per member."""
    shared = (
        "tracking=none",
        "train.dtype=float64",
        "model.depth=2",
        "model.width=8",
        "train.batch_size=16",
        "optim=sgd",
        "train.steps=6",
        "probes.every=3",
        f"train.engine={engine}",
        "probes.noise=true",
        "probes.jacobian_every=3",
        "probes.sharpness_every=2",
        "probes.sharpness_iters=6",
    )
    cfgs = [
        make_config(*shared, "seed=0", "model.dropout=0.2"),
        make_config(*shared, "seed=1", "optim.lr=0.003", "model.init_gain=1.5"),
    ]
    members = assert_same_run(cfgs, tmp_path)
    logged = set(members[1][1].frame().quantity)  # no dropout: the theory's twins are there too
    assert {"gns/total", "jacobian/sv2_nvar", "theory/jacobian_sv2_nvar", "sharpness/top"} <= logged
    drawn = [make_config(*shared, f"seed={s}", "probes.noise_batch=8", "train.loss=mse") for s in (3, 4)]
    assert_same_run(drawn, tmp_path / "drawn")
