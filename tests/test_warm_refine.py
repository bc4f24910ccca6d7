"""Refinement after the warm phase (issue 9): the corrected map, the probe's decision,
the corrections' accounting, and answers and gradients equal to the plain path's."""

from __future__ import annotations

import math

import pytest
import torch
from speed_support import instrument, rel_err

import pcdeq_plugin as P
from pcdeq_plugin.cell_map import PcDEQCellMap
from pcdeq_plugin.cells import PcDEQConv, PcDEQLinear
from pcdeq_plugin.checks import ArgumentError
from pcdeq_plugin.warm_start import PROBE_MARGIN, refine_iterate

TOL = 1e-4


def _cell_map(kind: str) -> tuple[PcDEQCellMap, torch.Tensor]:
    """A float32 pcDEQ map and a nonnegative state near its fixed point."""
    torch.manual_seed(0)
    if kind == "conv":
        block, pre = PcDEQConv(6, init_scale=0.05), torch.randn(3, 6, 8, 8)
    else:
        block, pre = PcDEQLinear(40, init_scale=0.05), torch.randn(3, 40)
    with torch.no_grad():
        cell_map = PcDEQCellMap(block, block.injection(pre), block.weight)
        z = cell_map.image_of_zero()
        for _ in range(3):
            z = cell_map(z)
    return cell_map, z


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_refinement_is_the_map_at_its_base_and_close_to_it_nearby(kind: str) -> None:
    cell_map, base = _cell_map(kind)
    with torch.no_grad():
        image, corrected = cell_map.refinement(base, torch.bfloat16)
        # the one float32 evaluation is the map itself, bit for bit
        assert image.dtype == torch.float32 and torch.equal(image, cell_map(base))
        z = image
        exact = cell_map(z)
        out = corrected(z, torch.empty_like(z))
        # the bfloat16 part only carries z - base: its error is bfloat16's rounding of
        # that fraction of the state (2^-8 with room), far below a whole bfloat16
        # evaluation's
        fraction = rel_err(z, base)
        assert 0 < fraction < 0.1
        assert rel_err(out, exact) < 2**-8 * fraction + 1e-6
        whole_bf16 = cell_map.in_precision(torch.bfloat16)(z.bfloat16()).float()
        assert rel_err(out, exact) < rel_err(whole_bf16, exact) / 4
        # rows: the same numbers for those samples
        rows = torch.tensor([0, 2])
        image_rows, corrected_rows = cell_map.refinement(base, torch.bfloat16, rows)
        assert torch.allclose(image_rows, image[rows], rtol=1e-6, atol=1e-7)
        out_rows = corrected_rows(image_rows, torch.empty_like(image_rows))
        assert torch.allclose(out_rows, out[rows], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_adjoint_refinement_is_the_adjoint_at_its_base_and_close_to_it_nearby(kind: str) -> None:
    cell_map, z_star = _cell_map(kind)
    step = cell_map.linearized_step(z_star)
    grad = torch.randn(z_star.shape, generator=torch.Generator().manual_seed(3))
    adjoint = step.adjoint(grad)
    with torch.no_grad():
        base = adjoint(adjoint(grad))  # two adjoint iterations from the gradient
        image, corrected = step.adjoint_refinement(grad)(base, torch.bfloat16, None)
        assert torch.equal(image, adjoint(base))
        exact = adjoint(image)
        out = corrected(image, torch.empty_like(image))
        fraction = rel_err(image, base)
        assert 0 < fraction < 0.5
        assert rel_err(out, exact) < 2**-7 * fraction + 1e-6
        # the iterate it returned is its own memory: reusing it as a buffer is safe
        again = corrected(out, image)
        assert rel_err(again, adjoint(exact)) < 2**-7 * fraction + 1e-5
        rows = torch.tensor([1])
        image_rows, _ = step.adjoint_refinement(grad)(base, torch.bfloat16, rows)
        assert torch.allclose(image_rows, adjoint(base)[rows], rtol=1e-5, atol=1e-6)


def _affine_refinement(rate: float, floor: float = 0.0, nan: bool = False):
    """A refinement of ``f(z) = rate z + c`` around ``base = 0`` whose corrected map adds
    fresh random relative errors of size ``floor`` at every call (a rounding floor), or
    NaN; the fixed point is ``c / (1 - rate)``."""
    generator = torch.Generator().manual_seed(0)
    c = torch.rand(4, 5, generator=generator) + 1.0
    base = torch.zeros(4, 5)

    def exact(z: torch.Tensor) -> torch.Tensor:
        return rate * z + c

    def refinement(rows):
        picked_c = c if rows is None else c[rows]
        picked_base = base if rows is None else base[rows]

        def corrected(z, out):
            out.copy_(rate * z + picked_c)
            out.mul_(1 + floor * torch.randn(out.shape, generator=generator))
            return out.fill_(math.nan) if nan else out

        return rate * picked_base + picked_c, corrected

    return refinement, exact, base


def _worst(fz: torch.Tensor, z: torch.Tensor) -> float:
    return float(((fz - z).norm(dim=1) / fz.norm(dim=1)).max())


def test_refine_iterate_corrects_until_the_next_float32_evaluation_meets_tol() -> None:
    refinement, exact, base = _affine_refinement(rate=0.5)
    result = refine_iterate(refinement, 4, tol=TOL, max_iter=50)
    assert result is not None
    z, corrections = result
    # the float32 check that follows passes, with the probe's margin
    assert _worst(exact(z), z) < PROBE_MARGIN * TOL
    # and not one correction more than that needs (each halves the residual)
    z_before = exact(base)
    for _ in range(corrections - 1):
        z_before = exact(z_before)
    assert _worst(exact(z_before), z_before) >= PROBE_MARGIN * TOL


def test_refine_iterate_leaves_fast_solves_to_plain_iteration() -> None:
    # the first float32 image already meets tol: nothing to replace
    refinement, _, _ = _affine_refinement(rate=1e-5)
    assert refine_iterate(refinement, 4, tol=TOL, max_iter=50) is None


@pytest.mark.parametrize(
    "case", [{"floor": 1e-2}, {"nan": True}], ids=["floor above tol", "non-finite"]
)
def test_refine_iterate_gives_up_where_corrections_cannot_help(case: dict) -> None:
    refinement, _, _ = _affine_refinement(rate=0.5, **case)
    assert refine_iterate(refinement, 4, tol=TOL, max_iter=50) is None


def test_refine_iterate_accepts_a_map_that_declines() -> None:
    assert refine_iterate(lambda rows: None, 4, tol=TOL, max_iter=50) is None


def test_refine_iterate_respects_its_budget() -> None:
    refinement, _, _ = _affine_refinement(rate=0.5)
    # 14 halvings are needed from 1 to 7e-5; 3 are allowed
    assert refine_iterate(refinement, 4, tol=TOL, max_iter=3) is None


def _slow_block(refine: bool) -> tuple[PcDEQConv, torch.Tensor]:
    """A conv block and an input whose plain float32 phase after a bfloat16 warm start
    needs three evaluations (the refinement makes one of them a correction)."""
    torch.manual_seed(0)
    config = P.SolverConfig(tol=TOL, warm_start="bf16", warm_refine=refine, on_failure="raise")
    block = PcDEQConv(8, init_scale=0.05, config=config)
    return block, torch.randn(3, 8, 10, 10)


def test_refinement_replaces_float32_iterations_with_the_same_answers() -> None:
    answers, records, logs = {}, {}, {}
    for refine in (False, True):
        block, pre = _slow_block(refine)
        logs[refine] = instrument(block)
        with torch.no_grad():
            answers[refine] = block(pre)
        records[refine] = block.last_stats.forward
    plain, refined = records[False], records[True]
    assert plain.refine_iterations == 0 and refined.refine_iterations > 0
    for record in (plain, refined):
        assert record.all_converged and float(record.residual.max()) < TOL
        assert record.residual.dtype == torch.float32
    # float32 evaluations of the whole batch (the first iteration from zero is free)
    full = {refine: logs[refine].count("cell", torch.float32, batch=3) for refine in (False, True)}
    assert full[True] < full[False]
    assert (
        full[True] == refined.iterations - 1 - refined.warm_iterations - refined.refine_iterations
    )
    assert logs[True].count("correction", batch=3) == refined.refine_iterations
    # both within tol of the fixed point: 10 tol apart at most (see test_warm_start)
    assert rel_err(answers[True], answers[False]) < 10 * TOL


def test_refinement_keeps_the_gradients() -> None:
    grads = {}
    for refine in (False, True):
        block, pre = _slow_block(refine)
        pre.requires_grad_()
        z = block(pre)
        weights = torch.randn(z.shape, generator=torch.Generator().manual_seed(2))
        (z * weights).sum().backward()
        grads[refine] = [pre.grad, *(p.grad for p in block.parameters())]
        # the forward and the adjoint solve both replace a float32 iteration here
        assert (block.last_stats.forward.refine_iterations > 0) == refine
        assert (block.last_stats.backward.refine_iterations > 0) == refine
        assert block.last_stats.backward.all_converged
    for got, want in zip(grads[True], grads[False]):
        assert rel_err(got, want) < 20 * TOL


def test_warm_refine_must_be_a_bool() -> None:
    with pytest.raises(ArgumentError, match="warm_refine"):
        P.SolverConfig(warm_refine="yes")
    assert P.SolverConfig(warm_refine=False).replace(warm_refine=True).warm_refine
