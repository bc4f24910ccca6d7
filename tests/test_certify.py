"""Runtime certificates: valid blocks certify for every catalogue activation; each negative
control (convex or decreasing activation, negative weight, zero pcDEQ-1 injection) is
flagged; the model-level helper certifies every block."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import pcdeq_plugin as P
from pcdeq_plugin.activations import BUILTIN_ACTIVATIONS
from pcdeq_plugin.cells import PcDEQBlock, PcDEQConv, PcDEQLinear
from pcdeq_plugin.certificates import Certificate, certify, certify_model, thompson_distance

ACTS = sorted(BUILTIN_ACTIVATIONS)


def make_block(kind: str, act: str, scale: float = 1.5, n: int = 4) -> PcDEQBlock:
    cls = PcDEQLinear if kind == "linear" else PcDEQConv
    block = cls(n, activation=act, constraint="clamp")
    with torch.no_grad():
        w = block.operator.parametrizations.weight.original
        w.copy_(torch.rand_like(w))
        w.mul_(scale / w.flatten(1).sum(dim=1).max())
    return block


def pre(kind: str, n: int = 4) -> torch.Tensor:
    return torch.randn((3, n) if kind == "linear" else (2, n, 4, 4))


def test_public_names() -> None:
    assert P.certify is certify and P.Certificate is Certificate
    assert P.certify_model is certify_model


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("act", ACTS)
def test_valid_block_is_certified(kind: str, act: str) -> None:
    block = make_block(kind, act)
    x = pre(kind)
    cert = certify(block, x, steps=400)
    assert cert.ok, cert.summary()
    assert cert.conditions_ok and cert.lower_monotone and cert.converged
    assert 0 < cert.kappa <= 1 and cert.local_rate < 1
    assert cert.empirical_rate is not None and cert.empirical_rate < 1
    assert cert.thompson_bound_held
    # the bracket contains the block's own fixed point
    block.config = P.SolverConfig(tol=1e-7, max_iter=2000)
    with torch.no_grad():
        z = block(x).double()
    assert (cert.lower <= z + 1e-5 * z).all()
    if math.isfinite(block.activation.upper_bound):
        assert cert.upper_monotone is True
        assert cert.bracket_width is not None and 0 <= cert.bracket_width < 1e-8
        assert (z <= cert.upper + 1e-5 * z).all()
    else:
        assert cert.upper_monotone is None and cert.bracket_width is None
        assert any("unbounded" in note for note in cert.notes)
    text = cert.summary()
    assert (
        text.startswith(f"pcDEQ certificate for {block.block_name}")
        and "OK" in text.splitlines()[0]
    )


@pytest.mark.parametrize("act", [n for n in ACTS if BUILTIN_ACTIVATIONS[n].kind == "positive"])
@pytest.mark.parametrize("scale", [0.01, 1.0, 100.0])
def test_positive_activation_uniform_bound(act: str, scale: float) -> None:
    cert = certify(make_block("linear", act, scale=scale), 3 * pre("linear"))
    assert cert.uniform_rate_bound == pytest.approx(0.5)
    assert cert.kappa >= 0.5 - 1e-12 and cert.local_rate <= 0.5 + 1e-12
    assert cert.empirical_rate <= 0.5 + 1e-6


def test_kappa_matches_definition() -> None:
    block = make_block("linear", "tanh", scale=0.8)
    x = pre("linear")
    cert = certify(block, x)
    with torch.no_grad():
        u = block.injection(x.double())
        g0 = block.cell(torch.zeros_like(u), u, block.weight.double())
    z_star = cert.lower
    assert cert.kappa == pytest.approx(float((g0 / z_star).min()), rel=1e-9)
    assert float(thompson_distance(cert.lower, cert.upper).max()) < 1e-8


# -- negative controls ----------------------------------------------------------------


def test_negative_weight_is_flagged() -> None:
    block = make_block("linear", "tanh")
    with torch.no_grad():
        block.operator.parametrizations.weight.original[2, 1] = -4.0
    cert = certify(block, pre("linear"))
    assert not cert.ok
    assert "nonnegative_weight" in cert.failed
    check = next(c for c in cert.conditions if c.name == "nonnegative_weight")
    assert "W[2, 1] = -4" in check.detail
    assert "FAIL" in cert.summary()


def test_zero_injection_for_pcdeq1_is_flagged() -> None:
    block = make_block("linear", "tanh")
    x = pre("linear")
    x[1, 2] = -1000.0  # softplus_5 underflows to exactly 0
    cert = certify(block, x)
    assert "injection" in cert.failed
    check = next(c for c in cert.conditions if c.name == "injection")
    assert "1 entries violate u > 0" in check.detail and "sample 1, index 2" in check.detail
    # pcDEQ-2 accepts u = 0
    cert2 = certify(make_block("linear", "sigmoid"), x)
    assert cert2.ok, cert2.summary()


def test_all_zero_injection_gives_the_trivial_fixed_point() -> None:
    cert = certify(make_block("linear", "tanh", scale=2.5), torch.full((2, 4), -1000.0))
    assert not cert.ok and cert.kappa == 0.0 and cert.local_rate == 1.0
    assert any("no Thompson contraction" in note for note in cert.notes)


def test_convex_activation_is_flagged() -> None:
    block = make_block("linear", "sigmoid")
    block.activation = P.ActivationSpec("softplus", F.softplus, "positive", math.inf)
    cert = certify(block, pre("linear"))
    assert not cert.ok and "activation" in cert.failed
    assert "concave" in next(c for c in cert.conditions if c.name == "activation").detail


def test_decreasing_activation_is_flagged() -> None:
    block = make_block("linear", "tanh")
    block.activation = P.ActivationSpec("neg_tanh", lambda t: -torch.tanh(t), "nonnegative", 1.0)
    cert = certify(block, pre("linear"))
    assert not cert.ok
    assert "activation" in cert.failed and "lower_monotone" in cert.failed


def test_wrong_kind_for_variant_is_flagged() -> None:
    block = make_block("linear", "tanh")
    block.activation = BUILTIN_ACTIVATIONS["sigmoid"]  # bypasses the constructor's check
    cert = certify(block, pre("linear"))
    assert "activation" in cert.failed
    assert (
        "pcDEQ-1 needs 'nonnegative'"
        in next(c for c in cert.conditions if c.name == "activation").detail
    )


def test_non_finite_input_is_flagged() -> None:
    x = pre("linear")
    x[0, 0] = float("nan")
    cert = certify(make_block("linear", "tanh"), x)
    assert "finite_input" in cert.failed


# -- model level and bad input ---------------------------------------------------------


def test_certify_model_every_block_and_state_restored() -> None:
    model = P.build_model("pcdeq-multi-conv-2", (1, 9, 9), 3, widths=(2, 3, 4))
    model.train()
    running = [
        m.running_mean.clone() for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)
    ]
    certs = certify_model(model, torch.rand(2, 1, 9, 9), steps=100)
    assert [c.block for c in certs] == ["block1", "block2", "block3"]
    assert all(c.ok for c in certs), "\n".join(c.summary() for c in certs)
    assert model.training and all(m.training for m in model.modules())
    after = [m.running_mean for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(torch.equal(a, b) for a, b in zip(running, after))
    assert all(len(b._forward_pre_hooks) == 0 for b in model.implicit_blocks())


def test_bad_arguments() -> None:
    block = make_block("linear", "tanh")
    with pytest.raises(TypeError, match="PcDEQBlock"):
        certify(torch.nn.Linear(2, 2), torch.randn(2, 2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"expected input of shape \[batch, 4\]"):
        certify(block, torch.randn(2, 5))
    with pytest.raises(ValueError, match="steps"):
        certify(block, pre("linear"), steps=1)
    with pytest.raises(ValueError, match="no pcDEQ block"):
        certify_model(torch.nn.Linear(2, 2), torch.randn(1, 2))
    for bad_tol in (-1.0, 0.0, float("nan"), "1e-10"):
        with pytest.raises(ValueError, match="tol must be a positive finite number"):
            certify(block, pre("linear"), tol=bad_tol)  # type: ignore[arg-type]
    for bad_dtype in ("float64", torch.int64):
        with pytest.raises(TypeError, match=r"dtype must be a floating torch.dtype.*or None"):
            certify(block, pre("linear"), dtype=bad_dtype)  # type: ignore[arg-type]
    x = pre("linear").float()
    assert certify(block, x, dtype=None, steps=50).lower.dtype == torch.float32  # kept


# -- a certificate never says OK for a solve that does not converge (issue 13, item 5) --


def _block_with_radius(act: P.ActivationSpec, radius: float, n: int = 4) -> PcDEQBlock:
    """A linear block whose W >= 0 has spectral radius exactly ``radius`` (W = radius * P,
    P a doubly stochastic matrix: Perron root 1)."""
    block = PcDEQLinear(n, activation="tanh", constraint="clamp")
    stochastic = torch.full((n, n), 0.5 / (n - 1)).fill_diagonal_(0.5)
    with torch.no_grad():
        block.operator.parametrizations.weight.original.copy_(radius * stochastic)
    block.activation = act  # bypasses the constructor's catalogue lookup
    return block


IDENTITY = P.ActivationSpec("identity", lambda t: t.clone(), "nonnegative", math.inf)
RELU = P.ActivationSpec("relu", F.relu, "nonnegative", math.inf)


@pytest.mark.parametrize("act", [IDENTITY, RELU], ids=["identity", "relu"])
@pytest.mark.parametrize("radius", [1.0, 1.3])
def test_unbounded_activation_with_spectral_radius_at_least_one_fails(act, radius) -> None:
    cert = certify(_block_with_radius(act, radius), pre("linear"))
    head = cert.summary().splitlines()[0]
    assert not cert.ok and "FAILED" in head and "OK" not in head
    assert "fixed_point_exists" in cert.failed and "not_converged" in cert.failed
    check = next(c for c in cert.conditions if c.name == "fixed_point_exists")
    assert f"rho(W) <= {radius:.4g}" in check.detail and "not below 1" in check.detail
    # the iterates really grow without bound: the lower sequence is far above the input scale
    assert float(cert.lower.max()) > 10


@pytest.mark.parametrize("act", [IDENTITY, RELU], ids=["identity", "relu"])
def test_unbounded_activation_with_spectral_radius_below_one_is_certified(act) -> None:
    cert = certify(_block_with_radius(act, 0.5), pre("linear"))
    assert cert.ok, cert.summary()
    check = next(c for c in cert.conditions if c.name == "fixed_point_exists")
    assert check.ok and "rho(W) <= 0.5 " in check.detail and "slope <= 1 " in check.detail


def test_a_certificate_that_did_not_converge_is_never_ok() -> None:
    # every condition holds (tanh, W >= 0, u > 0) but 3 steps cannot reach tol 1e-10
    cert = certify(make_block("linear", "tanh", scale=2.0), pre("linear"), steps=3)
    assert cert.conditions_ok and not cert.converged
    assert cert.failed == ["not_converged"] and not cert.ok
    assert "FAILED: not_converged" in cert.summary().splitlines()[0]


def test_spectral_radius_bounds_bracket_the_eigenvalue() -> None:
    from pcdeq_plugin.certificates import spectral_radius_bounds

    block = make_block("linear", "tanh", scale=1.7, n=6)
    weight = block.weight.detach().double()
    rho = float(torch.linalg.eigvals(weight).abs().max())
    low, high = spectral_radius_bounds(block, torch.Size([6]), weight)
    assert low <= rho + 1e-12 and rho <= high + 1e-12
    assert high - low < 1e-6


def test_asymptotic_slope_of_unbounded_activations() -> None:
    from pcdeq_plugin.activation_checks import asymptotic_slope

    assert asymptotic_slope(IDENTITY) == 1.0 and asymptotic_slope(RELU) == 1.0
    assert 0 < asymptotic_slope(BUILTIN_ACTIVATIONS["log1p"]) < 1e-7  # sublinear
    assert asymptotic_slope(BUILTIN_ACTIVATIONS["tanh"]) == 0.0  # bounded


# -- the contraction estimate is computed, not assumed ----------------------------------


def _empirical_rate_by_definition(block: PcDEQBlock, x: torch.Tensor, z_star: torch.Tensor):
    """max over steps k of d_T(z_{k+1}, z*) / d_T(z_k, z*) from z_1 = g(0), measured while
    d_T(z_k, z*) > 1e-7 (the certificate's floor), written out independently."""
    with torch.no_grad():
        u = block.injection(x.double())
        w = block.weight.double()

        def g(z):
            return block.activation.fn(z @ w.T + u)

        z = g(torch.zeros_like(u))
        worst = 0.0
        for _ in range(200):
            d = (z.log() - z_star.log()).abs().amax(dim=1)
            if not bool((d > 1e-7).any()):
                break
            nxt = g(z)
            d_next = (nxt.log() - z_star.log()).abs().amax(dim=1)
            keep = d > 1e-7
            worst = max(worst, float((d_next[keep] / d[keep]).max()))
            z = nxt
    return worst


@pytest.mark.parametrize(("act", "scale"), [("tanh", 0.3), ("tanh", 2.5), ("sigmoid", 3.0)])
def test_empirical_rate_matches_its_definition(act: str, scale: float) -> None:
    block, x = make_block("linear", act, scale=scale), pre("linear")
    cert = certify(block, x, steps=400)
    expected = _empirical_rate_by_definition(block, x, cert.lower)
    assert cert.empirical_rate == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_empirical_rate_grows_with_the_weight_scale() -> None:
    x = pre("linear")
    weak = certify(make_block("linear", "tanh", scale=0.05), x, steps=400)
    strong = certify(make_block("linear", "tanh", scale=3.0), x, steps=400)
    assert weak.empirical_rate < 0.1 < 0.5 < strong.empirical_rate < 1
    assert weak.local_rate < strong.local_rate < 1
