"""Nonnegativity of the recurrent weight: every scheme keeps W >= 0 through training steps;
the guarded scheme survives a zero row of v where the paper's scheme gives NaN."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import pcdeq_plugin as P
from pcdeq_plugin.cells import PcDEQConv, PcDEQLinear
from pcdeq_plugin.constraints import (
    CONSTRAINTS,
    NonNegativeSoftplus,
    NonNegativeWeightNorm,
    apply_constraint,
    get_constraint,
    initialize_nonnegative_,
    project_nonnegative_,
)

SCHEMES = sorted(CONSTRAINTS)


def test_public_names() -> None:
    assert P.NonNegativeWeightNorm is NonNegativeWeightNorm
    assert P.NonNegativeSoftplus is NonNegativeSoftplus
    assert {"weight_norm", "guarded_weight_norm", "softplus"} <= set(SCHEMES)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("cls", [PcDEQLinear, PcDEQConv])
def test_weight_stays_nonnegative_under_adamw(scheme: str, cls: type) -> None:
    block = cls(4, constraint=scheme)
    opt = torch.optim.AdamW(block.parameters(), lr=0.05, weight_decay=1e-2)
    pre = torch.randn((8, 4) if cls is PcDEQLinear else (2, 4, 4, 4))
    for _ in range(6):
        # a loss that pushes every entry of W down (it would go negative unconstrained)
        loss = block(pre).sum() + 10 * block.weight.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        block.after_optimizer_step()
        w = block.weight
        assert torch.isfinite(w).all() and (w >= 0).all()
    assert block.constraint_scheme == scheme


@pytest.mark.parametrize("scheme", ["weight_norm", "guarded_weight_norm", "clamp"])
def test_projection_is_needed_and_works(scheme: str) -> None:
    """Without the projection a step can make W negative: the projection is what enforces it."""
    layer = nn.Linear(3, 3, bias=False)
    initialize_nonnegative_(layer.weight)
    apply_constraint(layer, scheme)
    opt = torch.optim.SGD(layer.parameters(), lr=1.0)
    layer.weight.sum().backward()
    opt.step()
    assert (layer.weight < 0).any()
    project_nonnegative_(layer)
    assert (layer.weight >= 0).all()


def test_official_initialisation() -> None:
    block = PcDEQLinear(80)
    v = block.operator.parametrizations.weight.original1.detach()
    g = block.operator.parametrizations.weight.original0.detach()
    bound = math.sqrt(1e-4) / math.sqrt(160)
    assert (v >= 0).all() and float(v.max()) < bound and float(v.max()) > 0.9 * bound
    torch.testing.assert_close(g, v.norm(dim=1, keepdim=True))  # g = ||v|| at init
    torch.testing.assert_close(block.weight.detach(), v)  # so W equals the initial v
    conv = PcDEQConv(6)
    assert conv.operator.parametrizations.weight.original0.shape == (6, 1, 1, 1)
    assert float(conv.weight.detach().max()) < math.sqrt(1e-4) / math.sqrt(
        12
    )  # kernel size ignored


def test_zero_row_plain_is_nan_guarded_is_not() -> None:
    """The paper's weight norm has no epsilon: a zero row of v makes that row NaN (documented
    hazard); the guarded scheme gives a zero row instead and the block still solves."""
    plain, guarded = (
        PcDEQLinear(3, constraint="weight_norm"),
        PcDEQLinear(3, constraint="guarded_weight_norm"),
    )
    for block in (plain, guarded):
        with torch.no_grad():
            block.operator.parametrizations.weight.original1[1].fill_(-1.0)
        block.after_optimizer_step()  # clamps the whole row to 0
    assert torch.isnan(plain.weight[1]).all() and torch.isfinite(plain.weight[0]).all()
    w = guarded.weight
    assert torch.isfinite(w).all() and (w[1] == 0).all() and (w >= 0).all()
    z = guarded(torch.randn(2, 3))
    assert torch.isfinite(z).all()
    z.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in guarded.parameters())


def test_softplus_round_trip_and_positivity() -> None:
    sp = NonNegativeSoftplus(beta=2.0)
    w = torch.tensor([[1e-6, 0.5], [3.0, 40.0]], dtype=torch.float64)
    torch.testing.assert_close(sp(sp.right_inverse(w)), w, rtol=1e-9, atol=1e-15)
    assert (sp(torch.full((2, 2), -800.0)) >= 0).all()
    layer = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(w)
    apply_constraint(layer, sp)
    torch.testing.assert_close(layer.weight.double(), w.float().double(), rtol=1e-5, atol=1e-9)


def test_cached_parametrization_computes_once() -> None:
    layer = nn.Linear(3, 3, bias=False)
    apply_constraint(layer, "guarded_weight_norm")
    with parametrize.cached():
        assert layer.weight is layer.weight
    assert layer.weight is not layer.weight


def test_errors_name_the_choices() -> None:
    with pytest.raises(
        ValueError,
        match="unknown constraint 'exp'; available: clamp, guarded_weight_norm, softplus, weight_norm",
    ):
        get_constraint("exp")
    with pytest.raises(ValueError, match="no nonnegativity constraint"):
        project_nonnegative_(nn.Linear(2, 2))
    layer = nn.Linear(2, 2, bias=False)
    apply_constraint(layer)
    with pytest.raises(ValueError, match="already parametrized"):
        apply_constraint(layer)
    with pytest.raises(ValueError, match="eps"):
        NonNegativeWeightNorm(eps=-1)
    with pytest.raises(ValueError, match="beta"):
        NonNegativeSoftplus(beta=0)
    with pytest.raises(ValueError, match="scale"):
        initialize_nonnegative_(torch.empty(2, 2), scale=-1)
