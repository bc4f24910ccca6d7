"""monDEQ baseline: operators, FFT inverses, splitting solvers, gradients, models, registry."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from pcdeq_baselines import mondeq
from pcdeq_baselines.mondeq.fft import circular_conv, conv_transfer, from_frequency, to_frequency
from pcdeq_baselines.mondeq.multitier import MonMultiTierOperator
from pcdeq_baselines.mondeq.ops import MonFcOperator, MonSingleConvOperator, border_mask
from pcdeq_baselines.mondeq.splitting import relu_prox, solve_equilibrium

from pcdeq_plugin import ConvergenceError, ConvergenceWarning, ImplicitModel, build_model

# -- helpers ------------------------------------------------------------------------------


def _flat(state):
    return torch.cat([t.flatten(1) for t in state], dim=1)


def _unflat(v, shapes):
    out, i = [], 0
    for s in shapes:
        n = math.prod(s[1:])
        out.append(v[:, i : i + n].reshape(v.shape[0], *s[1:]))
        i += n
    return tuple(out)


def _dense(fn, shapes):
    """Matrix of a linear map on states (column j = fn(e_j))."""
    n = sum(math.prod(s[1:]) for s in shapes)
    basis = torch.eye(n)
    return _flat(fn(_unflat(basis, [(n, *s[1:]) for s in shapes]))).T


def _randomise_gains(op):
    with torch.no_grad():
        for name, p in op.named_parameters():
            if name.split(".")[-1] in ("g", "h", "g_down"):
                p.uniform_(0.5, 2.0)


OPERATORS = {
    "fc": lambda: MonFcOperator(7, 5),
    "single-conv": lambda: MonSingleConvOperator(2, 3, (6, 8)),
    "multi-tier": lambda: MonMultiTierOperator(2, (2, 3, 2), (6, 6)),
    "multi-tier-4": lambda: MonMultiTierOperator(1, (2, 2, 3, 2), (10, 10)),
}


# -- the linear parts -----------------------------------------------------------------------


def test_transfer_matrices_reproduce_circular_convolution(float64):
    w = torch.randn(3, 2, 3, 3)
    x = torch.randn(4, 2, 6, 8)
    via_fft = from_frequency(conv_transfer(w, (6, 8)) @ to_frequency(x))
    assert torch.allclose(via_fft, circular_conv(x, w), atol=1e-12)


@pytest.mark.parametrize("kind", sorted(OPERATORS))
def test_operator_is_strongly_monotone_and_transpose_is_exact(kind, float64):
    op = OPERATORS[kind]()
    _randomise_gains(op)
    shapes = op.state_shapes(1)
    w = _dense(op.multiply, shapes)
    wt = _dense(op.multiply_transpose, shapes)
    assert torch.allclose(wt, w.T, atol=1e-12)
    eye = torch.eye(w.shape[0])
    sym = eye - (w + w.T) / 2
    assert torch.linalg.eigvalsh(sym).min() >= op.m - 1e-9


@pytest.mark.parametrize("kind", sorted(OPERATORS))
@pytest.mark.parametrize("alpha", [0.3, 1.0])
def test_resolvent_equals_dense_inverse(kind, alpha, float64):
    """(I + alpha (I - W))^-1 through the FFT (and Woodbury for multi-tier) is exact."""
    op = OPERATORS[kind]()
    _randomise_gains(op)
    shapes = op.state_shapes(1)
    w = _dense(op.multiply, shapes)
    eye = torch.eye(w.shape[0])
    dense_inverse = torch.linalg.inv(eye + alpha * (eye - w))
    resolvent = op.resolvent(alpha)
    assert torch.allclose(_dense(resolvent.apply, shapes), dense_inverse, atol=1e-10)
    assert torch.allclose(_dense(resolvent.apply_transpose, shapes), dense_inverse.T, atol=1e-10)


def test_multi_tier_rejects_odd_sizes():
    with pytest.raises(ValueError, match="even"):
        MonMultiTierOperator(1, (2, 2, 2), (7, 7))


# -- solves -------------------------------------------------------------------------------------

TINY = {
    "mondeq-fc": {"width": 6},
    "mondeq-single-conv": {"channels": 3, "pool": 2},
    "mondeq-multi-tier": {"channels": (2, 3, 2)},
}


def _tiny(name, **overrides):
    options = {"tune_alpha": False, **TINY[name], **overrides}
    return build_model(name, (1, 4, 6) if name != "mondeq-multi-tier" else (1, 4, 4), 3, **options)


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize(
    ("splitting", "alpha"),
    # Peaceman-Rachford converges for every alpha > 0, and alpha tuning (on by default)
    # moves it away from 1: alpha enters the bias term too, so test it off 1 as well
    [("peaceman-rachford", 0.3), ("peaceman-rachford", 1.0), ("peaceman-rachford", 2.5),
     ("forward-backward", 0.5)],
)  # fmt: skip
def test_equilibrium_satisfies_the_layer_equation(name, splitting, alpha, float64):
    model = _tiny(
        name,
        splitting=splitting,
        alpha=alpha,
        tol=1e-10,
        max_iter=2000,
        stop_rule="residual",
    )
    block = model.block
    x = torch.randn(5, *((1, 4, 6) if name != "mondeq-multi-tier" else (1, 4, 4)))
    with torch.no_grad():
        z = block(x)
        op = block.operator
        masks = op.interior_masks(z[0])
        pre = [w + b for w, b in zip(op.multiply(z), op.injection(x))]
        image = [torch.relu(p) * (1 if m is None else m) for p, m in zip(pre, masks)]
    for zi, fi in zip(z, image):
        assert torch.allclose(zi, fi, atol=1e-8)
        assert (zi >= 0).all()
    for zi, m in zip(z, masks):
        if m is not None:
            assert (zi * (1 - m)).abs().max() == 0  # the border stays zero
    stats = block.last_stats.forward
    assert stats.all_converged and stats.max_residual < 1e-8
    assert stats.solver == splitting and stats.unit == "iter"


@pytest.mark.parametrize("name", sorted(TINY))
def test_forward_backward_and_peaceman_rachford_agree(name, float64):
    shape = (1, 4, 6) if name != "mondeq-multi-tier" else (1, 4, 4)
    torch.manual_seed(3)
    pr = _tiny(name, splitting="pr", tol=1e-11, max_iter=3000, stop_rule="residual")
    fb = _tiny(name, splitting="fb", alpha=0.25, tol=1e-11, max_iter=3000, stop_rule="residual")
    fb.load_state_dict(pr.state_dict())
    fb.block.alpha = 0.25
    x = torch.randn(4, *shape)
    with torch.no_grad():
        assert torch.allclose(pr(x), fb(x), atol=1e-8)
    assert pr.block.last_stats.forward.iterations < fb.block.last_stats.forward.iterations


def _unrolled_logits(model, x, alpha=0.3, iterations=150):
    """The same network with the equilibrium computed by differentiable FB iterations."""
    op = model.block.operator
    bias = op.injection(x)
    prox = relu_prox(op.interior_masks(bias[0]))
    z = tuple(torch.zeros_like(b) for b in bias)
    for _ in range(iterations):
        wz = op.multiply(z)
        z = prox(tuple((1 - alpha) * zi + alpha * (w + b) for zi, w, b in zip(z, wz, bias)))
    if isinstance(model, mondeq.MonDEQFcNet):
        return model.head(z[0])
    if isinstance(model, mondeq.MonDEQSingleConvNet):
        return model.head(torch.nn.functional.avg_pool2d(z[0], model.pool).flatten(1))
    return model.head(z[-1].flatten(1))


@pytest.mark.parametrize(
    ("name", "splitting"),
    [
        ("mondeq-fc", "pr"),
        ("mondeq-fc", "fb"),
        ("mondeq-single-conv", "pr"),
        ("mondeq-single-conv", "fb"),
        ("mondeq-multi-tier", "pr"),
    ],
)
def test_implicit_gradients_match_unrolled_autograd(name, splitting, float64):
    shape = (1, 4, 6) if name != "mondeq-multi-tier" else (1, 4, 4)
    torch.manual_seed(1)
    model = _tiny(
        name,
        splitting=splitting,
        alpha=0.5 if splitting == "fb" else 1.0,
        tol=1e-12,
        max_iter=3000,
        stop_rule="residual",
    )
    _randomise_gains(model.block.operator)
    x = torch.randn(3, *shape)
    target = torch.tensor([0, 2, 1])
    params = [p for p in model.parameters()]
    loss = torch.nn.functional.cross_entropy(model(x), target)
    implicit = torch.autograd.grad(loss, params)
    backward = model.block.last_stats.backward
    assert backward is not None and backward.all_converged and backward.max_residual < 1e-9
    loss_u = torch.nn.functional.cross_entropy(_unrolled_logits(model, x), target)
    unrolled = torch.autograd.grad(loss_u, params)
    assert torch.allclose(loss, loss_u, atol=1e-10)
    for (pname, _), gi, gu in zip(model.named_parameters(), implicit, unrolled):
        scale = gu.abs().max().clamp(min=1e-6)
        assert (gi - gu).abs().max() / scale < 1e-6, pname


# -- failure reporting ----------------------------------------------------------------------------


def test_forced_iteration_cap_is_reported_not_hidden():
    model = _tiny("mondeq-fc", max_iter=1, tol=1e-9, stop_rule="residual")
    x = torch.randn(4, 1, 4, 6)
    with pytest.warns(ConvergenceWarning, match=r"did not converge for 4/4 samples after 1 iter"):
        logits = model(x)
    forward = model.block.last_stats.forward
    assert forward.iterations == 1 and forward.max_iter == 1
    assert forward.num_failed == 4 and not forward.all_converged
    with pytest.warns(ConvergenceWarning, match="backward"):
        logits.sum().backward()
    assert model.block.last_stats.backward.num_failed > 0

    # the paper's change-based rule is reported the same way
    paper_rule = _tiny("mondeq-single-conv", max_iter=2, tol=1e-9)
    with pytest.warns(ConvergenceWarning, match="after 2 iterations"):
        paper_rule(torch.randn(4, 1, 4, 6))
    assert paper_rule.block.last_stats.forward.num_failed > 0

    quiet = _tiny("mondeq-fc", max_iter=1, tol=1e-9, on_failure="ignore", stop_rule="residual")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet(x)
    assert quiet.block.last_stats.forward.num_failed == 4

    strict = _tiny("mondeq-fc", max_iter=1, tol=1e-9, on_failure="raise")
    with pytest.raises(ConvergenceError, match="mondeq"):
        strict(x)


def test_backward_cap_is_separate():
    model = _tiny("mondeq-single-conv", backward_max_iter=1, backward_tol=1e-12)
    x = torch.randn(2, 1, 4, 6)
    logits = model(x)
    assert model.block.last_stats.forward.all_converged
    with pytest.warns(ConvergenceWarning, match="backward"):
        logits.sum().backward()
    assert model.block.last_stats.backward.iterations == 1


# -- options, errors, tuning ------------------------------------------------------------------


def test_unknown_splitting_lists_both():
    with pytest.raises(ValueError, match="forward-backward, peaceman-rachford"):
        _tiny("mondeq-fc", splitting="douglas-rachford")


def test_unknown_option_lists_valid_ones():
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['widht'\].*width"):
        build_model("mondeq-fc", widht=10)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({"on_failure": "explode"}, "ignore, warn, raise"),
        ({"stop_rule": "x"}, "change, residual"),
        ({"alpha": -1.0}, "alpha"),
        ({"max_iter": 0}, "max_iter"),
    ],
)
def test_bad_solver_options(bad, match):
    with pytest.raises(ValueError, match=match):
        _tiny("mondeq-fc", **bad)


def test_alpha_tuning_picks_a_halving_that_does_not_slow_down():
    model = _tiny("mondeq-single-conv")
    block = model.block
    x = torch.randn(8, 1, 4, 6)
    alpha = model.tune_alpha(x)
    assert alpha <= block.max_alpha and math.log2(block.max_alpha / alpha).is_integer()
    with torch.no_grad():
        bias = block.operator.injection(x)
        at_best = block._solve(bias, alpha, None)[0].iterations
        at_max = block._solve(bias, block.max_alpha, None)[0].iterations
    assert at_best <= at_max
    assert float(model.state_dict()["block._alpha"]) == alpha  # saved with the weights


def test_alpha_tuning_restores_alpha_when_every_candidate_hits_the_cap():
    model = _tiny(
        "mondeq-fc", splitting="fb", alpha=0.3, max_iter=1, tol=1e-12, on_failure="ignore"
    )
    assert model.tune_alpha(torch.randn(4, 1, 4, 6)) == pytest.approx(0.3)


def test_alpha_is_tuned_on_the_paper_schedule():
    model = _tiny("mondeq-fc", tune_alpha=True, steps_per_epoch=40, alpha=0.75)
    x = torch.randn(4, 1, 4, 6)
    for step in range(1, 32):
        model(x)
        if step <= 20:
            assert model.block.alpha == 0.75  # batch 20 = mid-epoch is the first tuning
    assert model.block.alpha != 0.75
    assert int(model.block._train_batches) == 31
    model.eval()
    model(x)
    assert int(model.block._train_batches) == 31  # evaluation does not count


# -- models and registry ----------------------------------------------------------------------

PAPER_COUNTS = [
    ("mondeq-fc", (1, 28, 28), "mnist", 84_313),
    ("mondeq-single-conv", (1, 28, 28), "mnist", 79_500),
    ("mondeq-single-conv", (3, 32, 32), "svhn", 172_218),
    ("mondeq-single-conv", (3, 32, 32), "cifar10", 172_218),
    ("mondeq-single-conv", (3, 32, 32), "cifar10-large", 853_612),
    ("mondeq-multi-tier", (1, 28, 28), "mnist", 81_394),
    ("mondeq-multi-tier", (3, 32, 32), "svhn", 170_194),
    ("mondeq-multi-tier", (3, 32, 32), "cifar10", 170_194),
    ("mondeq-multi-tier", (3, 32, 32), "cifar10-large", 1_014_546),
]


@pytest.mark.parametrize(("name", "shape", "preset", "count"), PAPER_COUNTS)
def test_parameter_counts_match_the_paper(name, shape, preset, count):
    model = build_model(name, shape, 10, preset=preset)
    assert sum(p.numel() for p in model.parameters()) == count


def test_mnist_single_conv_paper_count_is_56_channels():
    model = build_model("mondeq-single-conv", (1, 28, 28), 10, channels=56)
    assert sum(p.numel() for p in model.parameters()) == 84_460


@pytest.mark.parametrize("name", sorted(mondeq.MODEL_SPECS))
def test_small_preset_trains_one_step_through_the_registry(name):
    model = build_model(name, (1, 28, 28), 10, preset="small")
    assert isinstance(model, ImplicitModel) and model.family == "mondeq"
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    model.after_optimizer_step()
    (stats,) = model.solver_stats()
    assert stats.forward.residual.shape == (8,) and stats.backward is not None
    assert stats.forward.iterations >= 1 and stats.backward.iterations >= 1
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    with torch.no_grad():
        assert not model(x).requires_grad


def test_projection_keeps_the_gain_in_the_monotone_region():
    model = build_model("mondeq-single-conv", (1, 8, 8), 3, channels=2)
    with torch.no_grad():
        model.block.operator.g.fill_(-0.5)
    model.after_optimizer_step()
    assert float(model.block.operator.g.detach()) == 0.0


def test_solver_on_nan_input_stops_and_reports():
    op = MonFcOperator(3, 4)
    bias = (torch.full((2, 4), float("nan")),)
    result = solve_equilibrium(
        op, bias, relu_prox((None,)), splitting="pr", alpha=1.0, tol=1e-3, max_iter=50
    )
    assert result.iterations == 1 and not result.converged.any()


def test_double_backward_is_refused():
    model = _tiny("mondeq-fc")
    loss = model(torch.randn(2, 1, 4, 6)).sum()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, [model.block.operator.U.weight], create_graph=True)


def test_bf16_autocast_solves_in_float32():
    model = _tiny("mondeq-single-conv")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.randn(2, 1, 4, 6))
    logits.float().sum().backward()
    assert model.block.last_stats.forward.all_converged
    assert model.block.last_stats.backward is not None
    assert torch.isfinite(model.block.operator.A.weight.grad).all()


@pytest.mark.parametrize("name", sorted(mondeq.MODEL_SPECS))
def test_models_move_between_dtypes_and_devices(name):
    """``.to()`` goes through ``nn.Module._apply``: nothing may shadow it."""
    model = build_model(name, (1, 8, 8), 3, preset="small").to(torch.float64).to("cpu")
    assert all(p.dtype == torch.float64 for p in model.parameters())
    with torch.no_grad():
        assert model(torch.rand(2, 1, 8, 8, dtype=torch.float64)).dtype == torch.float64


def test_zero_border_makes_the_circular_operator_act_like_a_zero_padded_one(float64):
    """With the state's one-pixel border at zero, W z on the interior never wraps around."""
    op = MonSingleConvOperator(1, 3, (7, 9))
    _randomise_gains(op)
    z = torch.randn(2, 3, 7, 9) * border_mask((7, 9), like=torch.zeros(1))
    a, b = op.kernels()
    conv = torch.nn.functional.conv2d
    conv_t = torch.nn.functional.conv_transpose2d
    ata = conv_t(conv(z, a, padding=1), a, padding=1)
    w_zero_padded = (1 - op.m) * z - op.g * ata + conv(z, b, padding=1) - conv_t(z, b, padding=1)
    (w_circular,) = op.multiply((z,))
    inside = (slice(None), slice(None), slice(1, -1), slice(1, -1))
    assert torch.allclose(w_circular[inside], w_zero_padded[inside], atol=1e-12)


@pytest.mark.parametrize(("preset", "steps"), [("mnist", 469), ("svhn", 573), ("cifar10", 391)])
def test_dataset_presets_place_the_mid_epoch_tuning(preset, steps):
    shape = (1, 28, 28) if preset == "mnist" else (3, 32, 32)
    model = build_model("mondeq-multi-tier", shape, 10, preset=preset)
    assert model.block.steps_per_epoch == steps
