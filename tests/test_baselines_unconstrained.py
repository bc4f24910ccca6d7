"""Unconstrained TorchDEQ baselines: sizes, implicit gradients, recorded (non-)convergence."""

from __future__ import annotations

import warnings

import pytest
import torch
from pcdeq_baselines.deq import (
    ACTIVATIONS,
    MODEL_SPECS,
    SOLVERS,
    UnconstrainedDEQBlock,
    build_deq_linear,
    build_deq_multi_conv,
    build_deq_single_conv,
)
from torch import nn

from pcdeq_plugin import ConvergenceError, ConvergenceWarning, ImplicitModel

# The same backbones as the official pcDEQ networks, hence the same parameter counts
# (reference pcdeq.md §2.2: the pcDEQ weight-norm gain g is replaced by an ordinary bias).
PCDEQ_COUNTS = [
    ("deq-linear", "mnist", (1, 28, 28), 70_410),
    ("deq-single-conv", "mnist", (1, 28, 28), 69_136),
    ("deq-single-conv", "svhn", (3, 32, 32), 164_760),
    ("deq-single-conv", "cifar10", (3, 32, 32), 164_760),
    ("deq-multi-conv", "mnist", (1, 28, 28), 41_278),
    ("deq-multi-conv", "svhn", (3, 32, 32), 130_950),
    ("deq-multi-conv", "cifar10", (3, 32, 32), 130_950),
    ("deq-multi-conv", "cifar10-aug", (3, 32, 32), 661_470),
]


@pytest.mark.parametrize(("name", "preset", "shape", "expected"), PCDEQ_COUNTS)
def test_parameter_counts_match_the_pcdeq_backbones(name, preset, shape, expected):
    spec = MODEL_SPECS[name]
    model = spec.factory(shape, 10, **spec.presets[preset])
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize("name", sorted(MODEL_SPECS))
def test_specs_and_small_preset_train_one_step(name):
    spec = MODEL_SPECS[name]
    assert spec.family == "deq" and {"mnist", "small"} <= set(spec.presets)
    model = spec.factory((1, 28, 28), 10, **spec.presets["small"])
    assert isinstance(model, ImplicitModel) and model.family == "deq"
    opt = torch.optim.AdamW(model.parameters(), lr=spec.training["lr"])
    loss = nn.functional.cross_entropy(model(torch.rand(4, 1, 28, 28)), torch.tensor([0, 1, 2, 3]))
    opt.zero_grad()
    loss.backward()
    opt.step()
    model.after_optimizer_step()
    stats = model.solver_stats()
    assert len(stats) == (3 if name == "deq-multi-conv" else 1)
    for block in stats:
        assert block.forward.unit == "iter" and 3 <= block.forward.iterations <= 50
        assert block.forward.residual.shape == (4,)
        assert block.backward is not None and 1 <= block.backward.iterations <= 50


def test_every_block_has_its_own_torchdeq_instance():
    model = build_deq_multi_conv((1, 28, 28), 10, widths=(2, 3, 4))
    deqs = [b.deq for b in model.implicit_blocks()]
    assert len({id(d) for d in deqs}) == 3


def _contractive_block(solver: str, width: int = 5, **kw) -> UnconstrainedDEQBlock:
    layer = nn.Linear(width, width)
    with torch.no_grad():  # spectral norm 0.6: a contraction, so the fixed point is unique
        layer.weight.mul_(0.6 / torch.linalg.matrix_norm(layer.weight, ord=2))
    opts = {"tol": 1e-11, "max_iter": 120, "on_failure": "raise", "recurrent_init": "torch", **kw}
    return UnconstrainedDEQBlock(layer, solver=solver, **opts)


def _unrolled(block: UnconstrainedDEQBlock, u: torch.Tensor, steps: int = 150) -> torch.Tensor:
    z = torch.zeros_like(u)
    for _ in range(steps):
        z = block.activation(block.layer(z) + u)
    return z


@pytest.mark.parametrize("solver", SOLVERS)
def test_implicit_gradient_matches_unrolled_autograd(solver, float64):
    torch.manual_seed(3)
    block = _contractive_block(solver)
    u = torch.randn(3, 5)
    weights = torch.randn(3, 5)
    grads = {}
    for label in ("implicit", "unrolled"):
        block.zero_grad()
        ui = u.clone().requires_grad_()
        z = block(ui) if label == "implicit" else _unrolled(block, ui)
        (weights * z).sum().backward()
        grads[label] = [block.layer.weight.grad.clone(), block.layer.bias.grad.clone(), ui.grad]
    for gi, gu in zip(grads["implicit"], grads["unrolled"]):
        assert torch.allclose(gi, gu, rtol=1e-7, atol=1e-9), (gi - gu).abs().max()
    assert block.last_stats.forward.all_converged and block.last_stats.backward.all_converged


def test_implicit_gradient_matches_unrolled_for_a_conv_cell(float64):
    torch.manual_seed(4)
    layer = nn.Conv2d(2, 2, 3, padding=1)
    with torch.no_grad():
        layer.weight.mul_(0.3)
    block = UnconstrainedDEQBlock(
        layer, tol=1e-11, max_iter=100, on_failure="raise", recurrent_init="torch"
    )
    u = torch.randn(2, 2, 4, 4, requires_grad=True)
    block(u).square().sum().backward()
    implicit = (layer.weight.grad.clone(), u.grad.clone())
    layer.zero_grad()
    u.grad = None
    _unrolled(block, u).square().sum().backward()
    assert torch.allclose(implicit[0], layer.weight.grad, rtol=1e-7, atol=1e-9)
    assert torch.allclose(implicit[1], u.grad, rtol=1e-7, atol=1e-9)


def test_iteration_counts_are_the_evaluations_the_solver_made():
    block = _contractive_block("fixed_point_iter", tol=1e-6)
    calls = []
    original = block.layer.forward
    block.layer.forward = lambda z: (calls.append(z.requires_grad), original(z))[1]
    u = torch.randn(2, 5, requires_grad=True)
    block(u).sum().backward()
    fwd, bwd = block.last_stats.forward, block.last_stats.backward
    solver_calls = calls.count(False)  # the solver runs without grad
    assert fwd.iterations == solver_calls - 1  # minus the differentiable step after the solve
    assert fwd.all_converged and fwd.max_residual <= 1e-6
    assert bwd.iterations >= 2 and bwd.all_converged and bwd.solver == "fixed_point_iter"
    block.eval()
    calls.clear()
    with torch.no_grad():
        block(u)
    assert block.last_stats.forward.iterations == len(calls)  # no extra step in eval
    assert block.last_stats.backward is None


def test_forced_failure_is_recorded_and_training_continues():
    torch.manual_seed(0)
    model = build_deq_linear(
        (1, 6, 6), 3, width=8, tol=1e-12, max_iter=3, backward_max_iter=3, on_failure="ignore"
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.deq.layer.weight.detach().clone()
    for _ in range(2):
        loss = nn.functional.cross_entropy(
            model(torch.rand(4, 1, 6, 6)), torch.tensor([0, 1, 2, 0])
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        (stats,) = model.solver_stats()
        assert stats.forward.num_failed == 4 and stats.forward.iterations == 3
        assert stats.forward.max_residual > 1e-12
        assert stats.backward.num_failed == 4 and stats.backward.iterations <= 3
    assert not torch.equal(before, model.deq.layer.weight)


def test_failure_policies():
    u = torch.randn(2, 5, requires_grad=True)
    warn = _contractive_block("anderson", tol=1e-12, max_iter=3, on_failure="warn")
    with pytest.warns(ConvergenceWarning, match="forward solve .* missed tol"):
        out = warn(u)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out.sum().backward()
    assert any("backward solve" in str(w.message) for w in caught)
    strict = _contractive_block("broyden", tol=1e-12, max_iter=2, on_failure="raise")
    with pytest.raises(ConvergenceError, match="broyden"):
        strict(u)


def test_bad_options_name_the_choices():
    layer = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="unknown activation 'swish'; available: tanh, relu"):
        UnconstrainedDEQBlock(layer, activation="swish")
    with pytest.raises(ValueError, match="unknown solver 'newton'; available: anderson, broyden"):
        UnconstrainedDEQBlock(layer, solver="newton")
    with pytest.raises(ValueError, match="backward solver 'simple_fixed_point_iter'"):
        UnconstrainedDEQBlock(layer, backward_solver="simple_fixed_point_iter")
    with pytest.raises(ValueError, match="max_iter must be an integer >= 3 for 'anderson'"):
        UnconstrainedDEQBlock(layer, max_iter=2)
    with pytest.raises(ValueError, match="solver_options may not set"):
        UnconstrainedDEQBlock(layer, solver_options={"tol": 1e-3})
    with pytest.raises(TypeError, match="unknown option.*'width'"):
        build_deq_multi_conv((1, 28, 28), 10, width=4)
    # the shared backbone pools what small inputs have (issue 12 fixed the fixed AvgPool2d(8)
    # that refused inputs below 8x8); below 7x7 the multi conv's strided convs leave nothing
    assert build_deq_single_conv((1, 6, 6), 10, width=4)(torch.rand(2, 1, 6, 6)).shape == (2, 10)
    with pytest.raises(ValueError, match="at least 7x7"):
        build_deq_multi_conv((1, 6, 6), 10)
    assert {"tanh", "relu"} <= set(ACTIVATIONS)


def test_caller_options_are_not_mutated():
    options = {"m": 4}
    block = _contractive_block("anderson", solver_options=options, tol=1e-6)
    block(torch.randn(2, 5))
    assert options == {"m": 4} and block.solver_options is not options
    assert block.deq.f_max_iter == 120 and block.deq.b_stop_mode == "rel"


def test_recurrent_init_options():
    torch.manual_seed(0)
    layer = nn.Conv2d(6, 6, 3, padding=1)
    UnconstrainedDEQBlock(layer)  # default "pcdeq": signed counterpart of the pcDEQ init
    bound = 1e-2 / 12**0.5
    assert layer.weight.abs().max() <= bound and (layer.weight < 0).any()
    assert torch.count_nonzero(layer.bias) == 0
    kept = nn.Linear(4, 4)
    before = kept.weight.detach().clone()
    UnconstrainedDEQBlock(kept, recurrent_init="torch")
    assert torch.equal(before, kept.weight)
    with pytest.raises(ValueError, match="unknown recurrent_init 'zeros'; available: pcdeq, torch"):
        UnconstrainedDEQBlock(nn.Linear(2, 2), recurrent_init="zeros")
