"""SubDEQ baseline: layers, certificate, uniqueness, implicit gradients, models, registry."""

from __future__ import annotations

import pytest
import torch
from pcdeq_baselines import subdeq
from pcdeq_baselines.subdeq import (
    NORMALIZED_SHIFT,
    PLAIN_SHIFT,
    activation_coefficient,
    make_subdeq_conv,
    make_subdeq_fc,
)

from pcdeq_plugin import ImplicitModel, build_model, get_solver

FC_SHAPE, CONV_SHAPE = (1, 4, 4), (2, 5, 5)


def _model(kind: str, **overrides):
    if kind == "fc":
        return make_subdeq_fc(FC_SHAPE, 3, **{"width": 6, **overrides})
    return make_subdeq_conv(CONV_SHAPE, 3, **{"channels": 3, "pool": 2, **overrides})


def _input(kind: str, batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, *(FC_SHAPE if kind == "fc" else CONV_SHAPE))


def _scale_recurrent(model, factor: float, nonnegative: bool = False) -> None:
    with torch.no_grad():
        w = model.block.W.weight
        if nonnegative:
            w.abs_()
        w.mul_(factor)


# -- the activation coefficient --------------------------------------------------------------


def test_activation_coefficients_of_the_released_shifts_sit_below_their_thresholds():
    plain, normalized = (
        activation_coefficient(PLAIN_SHIFT),
        activation_coefficient(NORMALIZED_SHIFT),
    )
    assert 0.995 < plain < 1.0
    assert 0.495 < normalized < 0.5
    # a brute-force grid agrees with the golden-section search
    t = torch.linspace(-20, 20, 400_001, dtype=torch.float64)
    grid = (t.abs() * (1 - torch.tanh(t) ** 2) / (torch.tanh(t) + PLAIN_SHIFT)).max()
    assert abs(float(grid) - plain) < 1e-6


def test_shift_must_keep_the_activation_positive():
    with pytest.raises(ValueError, match="shift must be a finite number > 1"):
        _model("fc", shift=0.9)


# -- the certificate ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["fc", "conv"])
@pytest.mark.parametrize("normalize", [False, True])
def test_certificate_is_the_activation_coefficient_for_nonnegative_weights(kind, normalize):
    model = _model(kind, normalize=normalize)
    _scale_recurrent(model, 0.5, nonnegative=True)
    cert = model.certificate(_input(kind))
    assert cert.nonnegative_weights
    assert cert.layer_coefficient == pytest.approx(cert.activation_coefficient)
    assert cert.threshold == (0.5 if normalize else 1.0)
    assert cert.guaranteed
    assert "guaranteed" in cert.summary()


@pytest.mark.parametrize("kind", ["fc", "conv"])
@pytest.mark.parametrize("normalize", [False, True])
def test_certificate_bounds_the_coefficient_on_the_invariant_box(kind, normalize, float64):
    """Random states in the box never exceed the bound; the fixed point's ratio is below it."""
    model = _model(kind, normalize=normalize)
    block = model.block
    x = _input(kind)
    with torch.no_grad():
        model(x)
    cert = model.certificate(x)
    assert cert.local_coefficient <= cert.layer_coefficient
    with torch.no_grad():
        y = block.injection(x)
        hi = torch.ones_like(y) if normalize else y + block.shift + 1
        lo = (
            (block.shift - 1 + y)
            / (block.shift + 1 + y.flatten(1).amax(1).view(-1, *[1] * (y.dim() - 1)))
            if normalize
            else y + block.shift - 1
        )
        for _ in range(20):
            z = lo + (hi - lo) * torch.rand_like(y)
            pos, neg = block.recurrent_parts(z)
            t = pos - neg
            ratio = (1 - torch.tanh(t) ** 2) * (pos + neg) / (torch.tanh(t) + y + block.shift)
            assert float(ratio.max()) <= cert.layer_coefficient + 1e-12


def test_certificate_flags_large_mixed_sign_weights():
    model = _model("fc", on_failure="ignore")
    _scale_recurrent(model, 50.0)
    with torch.no_grad():
        model(_input("fc"))
    cert = model.certificate()  # on the injection of the last forward pass
    assert not cert.guaranteed and cert.layer_coefficient > 1.0
    assert cert.local_coefficient > 1.0  # the guarantee certainly fails here
    assert "NOT guaranteed" in cert.summary()


# -- uniqueness and convergence ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "normalize", "shift", "nonnegative"),
    [
        ("fc", False, None, True),
        ("conv", True, None, True),
        ("fc", False, 3.0, False),
        ("conv", False, 3.0, False),
    ],
)
def test_fixed_point_is_the_same_from_any_positive_start(
    kind, normalize, shift, nonnegative, float64
):
    model = _model(kind, normalize=normalize, shift=shift)
    _scale_recurrent(model, 0.05 if not nonnegative else 0.3, nonnegative=nonnegative)
    block = model.block
    x = _input(kind, batch=3)
    cert = model.certificate(x)
    assert cert.guaranteed, cert.summary()
    with torch.no_grad():
        y = block.injection(x)
        picard = get_solver("fixed_point")
        starts = [
            torch.ones_like(y),
            1e-3 * torch.ones_like(y),
            50 * torch.rand_like(y) + 1e-2,
            torch.rand_like(y) + 0.5,
        ]
        solutions = []
        for z0 in starts:
            result = picard(lambda z: block.layer(z, y), z0, tol=1e-13, max_iter=500)
            assert result.stats.all_converged
            solutions.append(result.value)
    for other in solutions[1:]:
        assert torch.allclose(solutions[0], other, rtol=1e-10, atol=1e-12)
    assert (solutions[0] > 0).all()
    if normalize:
        assert torch.allclose(solutions[0].flatten(1).amax(1), torch.ones(3))


# -- forward/backward through the model ----------------------------------------------------------


def _unrolled_logits(model, x, iterations=200):
    block = model.block
    y = block.injection(x)
    z = torch.ones(block.state_shape(x))
    for _ in range(iterations):
        z = block.layer(z, y)
    if isinstance(model, subdeq.SubDEQFcNet):
        return model.head(model.norm(z))
    return model.head(model.pool(model.norm(z)).flatten(1))


@pytest.mark.parametrize(
    ("kind", "normalize"), [("fc", False), ("fc", True), ("conv", False), ("conv", True)]
)
def test_implicit_gradients_match_unrolled_autograd(kind, normalize, float64):
    model = _model(kind, normalize=normalize, tol=1e-12, max_iter=200)
    _scale_recurrent(model, 0.5)
    x = _input(kind)
    target = torch.tensor([0, 1, 2, 1])
    params = list(model.parameters())
    loss = torch.nn.functional.cross_entropy(model(x), target)
    implicit = torch.autograd.grad(loss, params)
    stats = model.solver_stats()[0]
    assert stats.forward.all_converged and stats.backward.all_converged
    assert stats.forward.solver == "anderson" and stats.backward.max_residual < 1e-10
    loss_u = torch.nn.functional.cross_entropy(_unrolled_logits(model, x), target)
    unrolled = torch.autograd.grad(loss_u, params)
    assert torch.allclose(loss, loss_u, atol=1e-10)
    for (name, _), gi, gu in zip(model.named_parameters(), implicit, unrolled):
        scale = gu.abs().max().clamp(min=1e-8)
        assert (gi - gu).abs().max() / scale < 1e-7, name


def test_released_solver_settings_and_statistics():
    model = _model("fc")
    assert model.block.config.solver == "anderson"
    assert (model.block.config.tol, model.block.config.max_iter) == (1e-3, 30)
    assert model.block.config.solver_options == {"memory": 5, "lam": 1e-4, "beta": 1.0}
    x = _input("fc", batch=5)
    model(x).sum().backward()
    (stats,) = model.solver_stats()
    assert stats.forward.residual.shape == (5,) and stats.forward.max_residual <= 1e-3
    assert stats.backward is not None and stats.backward.iterations >= 1


def test_iteration_cap_is_reported():
    model = _model("conv", max_iter=1, tol=1e-12)
    _scale_recurrent(model, 5.0)
    with pytest.warns(Warning, match="did not converge"):
        model(_input("conv"))
    assert model.block.last_stats.forward.num_failed > 0


# -- models and registry ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "shape", "preset", "count"),
    [
        # the released FC class also holds two unused 87-vectors (174 parameters): 77,092
        ("subdeq-fc", (1, 28, 28), "mnist", 77_092 - 174),
        ("subdeq-conv", (1, 28, 28), "mnist", 14_730),
        ("subdeq-conv", (3, 32, 32), "svhn", 29_866),
        ("subdeq-conv", (3, 32, 32), "cifar10", 29_866),
        ("subdeq-conv-normalized", (3, 32, 32), "cifar10", 29_866),
    ],
)
def test_parameter_counts_match_the_released_models(name, shape, preset, count):
    model = build_model(name, shape, 10, preset=preset)
    assert sum(p.numel() for p in model.parameters()) == count


def test_default_sizes_follow_the_input_shape():
    assert build_model("subdeq-conv", (1, 28, 28), 10).block.W.in_channels == 32
    assert build_model("subdeq-conv", (3, 32, 32), 10).block.W.in_channels == 48


@pytest.mark.parametrize("name", sorted(subdeq.MODEL_SPECS))
def test_small_preset_trains_one_step_through_the_registry(name):
    model = build_model(name, (1, 28, 28), 10, preset="small")
    assert isinstance(model, ImplicitModel) and model.family == "subdeq"
    assert model.block.normalize == name.endswith("-normalized")
    assert model.block.shift == (NORMALIZED_SHIFT if model.block.normalize else PLAIN_SHIFT)
    x, y = torch.rand(6, 1, 28, 28), torch.randint(0, 10, (6,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = model.block.W.weight.detach().clone()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    model.after_optimizer_step()
    assert not torch.equal(before, model.block.W.weight)
    assert model.solver_stats()[0].backward is not None
    model.eval()
    with torch.no_grad():
        assert not model(x).requires_grad


def test_unknown_option_lists_valid_ones():
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['chanels'\].*channels"):
        build_model("subdeq-conv", chanels=4)


def test_bad_pool_is_refused():
    with pytest.raises(ValueError, match="pool"):
        build_model("subdeq-conv", (1, 8, 8), 10, pool=9)


@pytest.mark.parametrize("kind", ["fc", "conv"])
def test_certificate_before_any_forward_uses_a_zero_injection(kind):
    model = _model(kind)
    with torch.no_grad():
        w = model.block.W.weight
        w.fill_(0.05)
        w.view(-1)[1] = -0.05  # one negative entry: a sign cancellation in one row
    cert = model.certificate()
    assert cert.local_coefficient != cert.local_coefficient  # nan: no fixed point yet
    assert not cert.nonnegative_weights
    assert cert.layer_coefficient > cert.activation_coefficient
    with torch.no_grad():
        w.abs_()
    assert model.certificate().layer_coefficient == pytest.approx(cert.activation_coefficient)
