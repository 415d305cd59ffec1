"""The hand-written backward pass against torch.autograd, in float64 (micrograd's way of testing)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from bpexp import backprop
from bpexp.backprop import (
    DERIVATIVES,
    backward,
    check_supported,
    dropout_masks,
    forward,
    gradcheck,
    manual_backward,
    relative_error,
    replay_masks,
    sgd_step,
)
from bpexp.config import Activation, ModelConfig, Norm
from bpexp.model import MLP, build_mlp

F64 = torch.float64


def rel(mine: torch.Tensor, ref: torch.Tensor) -> float:
    """‖mine − ref‖ / ‖ref‖, 0 when both are zero (written again here, independent of the module)."""
    diff = (mine - ref).norm().item()
    return 0.0 if diff == 0 else diff / ref.norm().item()


def make_case(
    depth: int = 3,
    width: int = 8,
    activation: Activation = Activation.tanh,
    residual: bool = False,
    dropout: float = 0.0,
    in_dim: int = 5,
    out_dim: int = 3,
    batch: int = 7,
    classification: bool = False,
    scale: float = 1.0,
    seed: int = 0,
    dtype: torch.dtype = F64,
) -> tuple[MLP, torch.Tensor, torch.Tensor]:
    """A model with random weights W ~ N(0, scale²/fan_in), b ~ N(0, 0.5²), random x and targets y."""
    cfg = ModelConfig(depth=depth, width=width, activation=activation, residual=residual, dropout=dropout)
    model = build_mlp(cfg, in_dim, out_dim).to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for linear in model.linears:
            fan_in = linear.in_features
            linear.weight.copy_(
                torch.randn(linear.weight.shape, generator=g, dtype=F64) * scale / fan_in**0.5
            )
            linear.bias.copy_(torch.randn(linear.bias.shape, generator=g, dtype=F64) * 0.5)
    x = (1.5 * torch.randn(batch, in_dim, generator=g, dtype=F64)).to(dtype)
    if classification:
        y = torch.randint(0, out_dim, (batch,), generator=g)
    else:
        y = torch.randn(batch, out_dim, generator=g, dtype=F64).to(dtype)
    return model, x, y


def autograd_reference(model: MLP, x, y, classification: bool, masks=None):
    """Loss, δ^(l) = z^(l).grad from MLP.trace and (∂L/∂W^(l), ∂L/∂b^(l)) from torch.autograd."""
    model.zero_grad(set_to_none=True)
    with replay_masks(model, masks):
        out, zs, _ = model.trace(x)
    loss = F.cross_entropy(out, y) if classification else F.mse_loss(out, y)
    loss.backward()
    delta = [z.grad for z in zs]
    grads = [(linear.weight.grad.clone(), linear.bias.grad.clone()) for linear in model.linears]
    model.zero_grad(set_to_none=True)
    return loss.detach(), delta, grads


# ------------------------------------------------------------------------------------------ derivatives
def test_every_activation_has_a_derivative():
    assert set(DERIVATIVES) == set(Activation)


@pytest.mark.parametrize("activation", list(Activation), ids=lambda a: a.value)
def test_derivative_matches_autograd_including_kinks_and_thresholds(activation):
    f = MLP(1, 1, ModelConfig(activation=activation)).f
    edges = [-40.0, -20.5, -1.0, -1e-3, 0.0, 1e-300, 1e-3, 1.0, 19.999, 20.0, 20.001, 40.0]
    z = torch.cat(
        [
            torch.tensor(edges, dtype=F64),
            4 * torch.randn(200, generator=torch.Generator().manual_seed(0), dtype=F64),
        ]
    )
    z.requires_grad_(True)
    (expected,) = torch.autograd.grad(f(z).sum(), z)
    # f' is O(1): a few ulp of 1 absolute (cancellation where gelu' crosses 0, 1 − tanh² near 1).
    torch.testing.assert_close(DERIVATIVES[activation](z.detach()), expected, rtol=1e-13, atol=1e-15)


# ----------------------------------------------------------------------------------- property: vs autograd
@settings(max_examples=50, deadline=None)
@given(
    depth=st.integers(0, 8),
    width=st.integers(1, 12),
    activation=st.sampled_from(list(Activation)),
    residual=st.booleans(),
    dropout=st.sampled_from([0.0, 0.0, 0.3]),
    in_dim=st.integers(1, 6),
    out_dim=st.integers(1, 5),
    batch=st.integers(1, 16),
    classification=st.booleans(),
    scale=st.floats(0.5, 2.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_manual_backward_matches_autograd(
    depth, width, activation, residual, dropout, in_dim, out_dim, batch, classification, scale, seed
):
    out_dim = max(out_dim, 2) if classification else out_dim
    model, x, y = make_case(
        depth, width, activation, residual, dropout, in_dim, out_dim, batch, classification, scale, seed
    )
    masks = dropout_masks(model, x, torch.Generator().manual_seed(seed))
    manual = backward(model, forward(model, x, masks), y, classification)
    loss, delta, grads = autograd_reference(model, x, y, classification, masks)

    assert rel(manual.loss, loss) <= 1e-12
    assert len(manual.delta) == len(delta) == model.n_layers
    # In a saturated unit f'(z) = 1 − tanh²(z) is a difference of two numbers near 1: where it is ~1e-6,
    # the ulp by which the two forwards may round z apart is a 1e-10 relative error in every δ below it
    # (seen: width 1, tanh, scale 2). 1e-8 still fails any wrong term by orders of magnitude.
    for l in range(1, model.n_layers + 1):
        (dW, db), (dW_ref, db_ref) = manual.grads[l - 1], grads[l - 1]
        assert rel(manual.delta[l - 1], delta[l - 1]) <= 1e-8, f"δ^({l})"
        assert rel(dW, dW_ref) <= 1e-8, f"∂L/∂W^({l})"
        assert rel(db, db_ref) <= 1e-8, f"∂L/∂b^({l})"


def test_forward_matches_the_model():
    model, x, _ = make_case(depth=4, residual=True, dropout=0.4, activation=Activation.gelu)
    masks = dropout_masks(model, x)
    fp = forward(model, x, masks)
    with replay_masks(model, masks):
        torch.testing.assert_close(fp.a[-1], model(x), rtol=1e-13, atol=1e-15)
    assert [z.shape[1] for z in fp.z] == [linear.out_features for linear in model.linears]
    assert len(fp.a) == model.n_layers + 1 and fp.a[0] is x


# --------------------------------------------------------------------------------------------- dropout
def test_dropout_with_a_shared_mask_matches_autograd():
    model, x, y = make_case(depth=5, width=10, dropout=0.5, residual=True, batch=16)
    masks = dropout_masks(model, x, torch.Generator().manual_seed(1))
    assert masks is not None and all((m == 0).any() and (m == 2).any() for m in masks)  # inverted: 1/(1-p)
    assert all(set(m.unique().tolist()) <= {0.0, 2.0} for m in masks)
    manual = backward(model, forward(model, x, masks), y, False)
    _, delta, grads = autograd_reference(model, x, y, False, masks)
    for mine, ref in zip(manual.delta, delta, strict=True):
        assert rel(mine, ref) <= 1e-12
    for (dW, db), (dW_ref, db_ref) in zip(manual.grads, grads, strict=True):
        assert rel(dW, dW_ref) <= 1e-12 and rel(db, db_ref) <= 1e-12
    # The mask matters: another mask gives other gradients, so the agreement above is not vacuous.
    other = backward(model, forward(model, x, dropout_masks(model, x)), y, False)
    assert rel(other.grads[0][0], grads[0][0]) > 1e-3


def test_masks_follow_torch_dropout_convention_and_eval_mode():
    model, x, y = make_case(dropout=0.25)
    kept = model.dropout(torch.ones(1000, dtype=F64)).unique().tolist()
    assert set(kept) == {0.0, 1 / 0.75}
    assert set(torch.cat(dropout_masks(model, x)).unique().tolist()) == {0.0, 1 / 0.75}
    model.eval()  # nn.Dropout is the identity in eval mode, and so is the manual engine
    assert dropout_masks(model, x) is None
    manual = backward(model, forward(model, x), y, False)
    _, _, grads = autograd_reference(model, x, y, False)
    assert rel(manual.grads[0][0], grads[0][0]) <= 1e-12


# ------------------------------------------------------------------------------------- .grad and SGD
def test_manual_backward_fills_grad_like_loss_backward():
    model, x, y = make_case(depth=3, classification=True, activation=Activation.elu)
    _, _, grads = autograd_reference(model, x, y, True)
    result = manual_backward(model, x, y, True)
    assert result.loss.ndim == 0 and len(result.delta) == model.n_layers
    for linear, (dW_ref, db_ref) in zip(model.linears, grads, strict=True):
        assert rel(linear.weight.grad, dW_ref) <= 1e-12 and rel(linear.bias.grad, db_ref) <= 1e-12
    manual_backward(model, x, y, True)  # accumulates, as loss.backward() does
    assert rel(model.linears[0].weight.grad, 2 * grads[0][0]) <= 1e-12


@pytest.mark.parametrize("classification", [False, True], ids=["mse", "cross_entropy"])
@pytest.mark.parametrize("update", ["sgd_step", "torch_optimizer"])
def test_50_steps_of_training_follow_the_same_loss_curve(classification, update):
    model, x, y = make_case(
        depth=5, width=16, residual=True, batch=256, out_dim=4, classification=classification, seed=3
    )
    twin = copy.deepcopy(model)
    lr, steps = 0.1, 50
    order = torch.Generator().manual_seed(4)
    batches = [torch.randint(0, len(x), (32,), generator=order) for _ in range(steps)]

    manual_losses = []
    manual_opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)  # used by "torch_optimizer"
    for idx in batches:
        if update == "sgd_step":
            result = backward(model, forward(model, x[idx]), y[idx], classification)
            sgd_step(model, result.grads, lr)  # W ← W − η ∂L/∂W
        else:  # any torch optimizer steps on the hand-written .grad
            result = manual_backward(model, x[idx], y[idx], classification)
            manual_opt.step()
            manual_opt.zero_grad()
        manual_losses.append(result.loss.item())

    auto_losses = []
    auto_opt = torch.optim.SGD(twin.parameters(), lr=lr, momentum=0.0 if update == "sgd_step" else 0.9)
    for idx in batches:
        out = twin(x[idx])
        loss = F.cross_entropy(out, y[idx]) if classification else F.mse_loss(out, y[idx])
        loss.backward()
        auto_opt.step()
        auto_opt.zero_grad()
        auto_losses.append(loss.item())

    assert manual_losses[-1] < 0.9 * manual_losses[0]  # it trained, so the comparison means something
    for mine, ref in zip(manual_losses, auto_losses, strict=True):
        assert abs(mine - ref) <= 1e-9 * abs(ref)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert rel(p.detach(), q.detach()) <= 1e-9


# ------------------------------------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("activation", list(Activation), ids=lambda a: a.value)
def test_gradcheck_float64(activation):
    model, x, y = make_case(depth=4, activation=activation, residual=True, dropout=0.2)
    assert gradcheck(model, x, y, False) <= 1e-10
    model, x, y = make_case(depth=2, activation=activation, classification=True)
    assert gradcheck(model, x, y, True) <= 1e-10


def test_gradcheck_float32_small_net():
    model, x, y = make_case(depth=2, width=16, dtype=torch.float32)
    assert model.linears[0].weight.dtype == torch.float32
    err = gradcheck(model, x, y, False)
    assert 0 <= err <= 1e-4


@pytest.mark.parametrize("activation", list(Activation), ids=lambda a: a.value)
def test_gradcheck_detects_a_wrong_derivative(monkeypatch, activation):
    model, x, y = make_case(depth=3, activation=activation)
    assert gradcheck(model, x, y, False) <= 1e-10
    right = DERIVATIVES[activation]
    monkeypatch.setitem(DERIVATIVES, activation, lambda z: 1.1 * right(z))  # f' off by 10 %
    assert gradcheck(model, x, y, False) > 1e-2


def test_gradcheck_detects_a_missing_residual_path(monkeypatch):
    model, x, y = make_case(depth=4, residual=True)
    assert gradcheck(model, x, y, False) <= 1e-10
    monkeypatch.setattr(backprop, "skips", lambda model, l: False)  # forward and backward forget the skip
    assert gradcheck(model, x, y, False) > 1e-2


def test_gradcheck_detects_a_wrong_output_delta(monkeypatch):
    model, x, y = make_case(depth=2, classification=True)
    right = backprop.output_delta
    no_batch_mean = lambda z, y, c, loss: right(z, y, c, loss) * z.shape[0]  # noqa: E731 - no 1/batch
    monkeypatch.setattr(backprop, "output_delta", no_batch_mean)
    assert gradcheck(model, x, y, True) > 1


def test_gradcheck_leaves_grads_and_rng_alone():
    model, x, y = make_case(depth=3, dropout=0.3)
    F.mse_loss(model.trace(x)[0], y).backward()  # as on a probe step: every .grad is filled
    grads = [p.grad.clone() for p in model.parameters()]
    params = [p.detach().clone() for p in model.parameters()]
    dropout, rng = model.dropout, torch.get_rng_state()

    assert gradcheck(model, x, y, False) <= 1e-10

    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params, strict=True))
    assert model.dropout is dropout
    assert torch.equal(torch.get_rng_state(), rng)  # the run's dropout/batch stream is not advanced
    fresh, x, y = make_case()
    gradcheck(fresh, x, y, False)
    assert all(p.grad is None for p in fresh.parameters())


def test_relative_error_conventions():
    zero, one = torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64)
    assert relative_error(zero, zero).item() == 0
    assert math.isinf(relative_error(one, zero).item())
    assert relative_error(2 * one, one).item() == pytest.approx(1.0)


# ------------------------------------------------------------------------------------ unsupported configs
@pytest.mark.parametrize("norm", [Norm.batchnorm, Norm.layernorm], ids=lambda n: n.value)
def test_norm_layers_are_refused_with_the_config_key(norm):
    model = build_mlp(ModelConfig(depth=2, width=4, norm=norm), 3, 2)
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    message = f"train.engine=manual cannot run model.norm={norm.value}"
    for call in (
        lambda: check_supported(model),
        lambda: manual_backward(model, x, y, False),
        lambda: gradcheck(model, x, y, False),
    ):
        with pytest.raises(ValueError, match=message):
            call()


def test_plain_mlp_is_supported():
    check_supported(build_mlp(ModelConfig(depth=2, width=4, dropout=0.1, residual=True), 3, 2))
