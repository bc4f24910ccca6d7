"""Refinement after the warm phase (issue 9): the corrected map, its error bound and the
certified last check, the probe's decision, the corrections' accounting, and answers and
gradients equal to the plain path's."""

from __future__ import annotations

import math

import pytest
import torch
from speed_support import instrument, rel_err

import pcdeq_plugin as P
from pcdeq_plugin.cell_map import PcDEQCellMap, correction_error_gain
from pcdeq_plugin.cells import PcDEQConv, PcDEQLinear
from pcdeq_plugin.checks import ArgumentError
from pcdeq_plugin.maps import Refinement
from pcdeq_plugin.warm_start import CERTIFY_ATTEMPTS, PROBE_MARGIN, refine_iterate

TOL = 1e-4


def _cell_map(kind: str, **block_options) -> tuple[PcDEQCellMap, torch.Tensor]:
    """A float32 pcDEQ map and a nonnegative state near its fixed point."""
    torch.manual_seed(0)
    if kind == "conv":
        block, pre = PcDEQConv(6, init_scale=0.05, **block_options), torch.randn(3, 6, 8, 8)
    else:
        block, pre = PcDEQLinear(40, init_scale=0.05, **block_options), torch.randn(3, 40)
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
        offered = cell_map.refinement(base, torch.bfloat16)
        image, corrected = offered.image, offered.corrected
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
        offered_rows = cell_map.refinement(base, torch.bfloat16, rows)
        image_rows, corrected_rows = offered_rows.image, offered_rows.corrected
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
        offered = step.adjoint_refinement(grad)(base, torch.bfloat16, None)
        image, corrected = offered.image, offered.corrected
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
        image_rows = step.adjoint_refinement(grad)(base, torch.bfloat16, rows).image
        assert torch.allclose(image_rows, adjoint(base)[rows], rtol=1e-5, atol=1e-6)


def _affine_refinement(
    rate: float, floor: float = 0.0, nan: bool = False, error_bound: float | None = None
):
    """A refinement of ``f(z) = rate z + c`` around ``base = 0`` whose corrected map adds
    fresh random relative errors of size ``floor`` at every call (a rounding floor), or
    NaN; the fixed point is ``c / (1 - rate)``. ``error_bound``: the refinement claims
    ``||f~(z) - f(z)|| <= error_bound`` per sample (else it claims nothing)."""
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

        bound = None
        if error_bound is not None:

            def bound(z, work):
                return torch.full((z.shape[0],), error_bound)

        return Refinement(rate * picked_base + picked_c, corrected, bound)

    return refinement, exact, base


def _worst(fz: torch.Tensor, z: torch.Tensor) -> float:
    return float(((fz - z).norm(dim=1) / fz.norm(dim=1)).max())


def test_refine_iterate_corrects_until_the_next_float32_evaluation_meets_tol() -> None:
    refinement, exact, base = _affine_refinement(rate=0.5)
    result = refine_iterate(refinement, 4, tol=TOL, max_iter=50)
    assert result is not None and result.residual is None  # no bound: float32 checks
    z, corrections = result.state, result.corrections
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


# -- the certified last check -------------------------------------------------------------


def test_correction_error_gain_counts_roundings_and_float32_accumulation() -> None:
    unit = 2.0**-8  # bfloat16's unit roundoff
    gain = correction_error_gain(torch.bfloat16, macs=738, roundings=3)
    assert 3 * unit < gain < 3.1 * unit
    assert correction_error_gain(torch.bfloat16, 738, 5) > gain
    assert correction_error_gain(torch.bfloat16, 10**6, 3) > gain + 0.05
    # float16 and float32 accumulation are not known to be float32 everywhere: no bound
    assert correction_error_gain(torch.float16, 738, 3) is None
    assert correction_error_gain(torch.float32, 738, 3) is None
    assert correction_error_gain(torch.bfloat16, 1 << 24, 3) is None


def _dense_matrix(block, weight: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The matrix of ``z -> block.linear_map(z, weight)`` on states of ``shape``."""
    n = math.prod(shape)
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
    return block.linear_map(basis, weight).reshape(n, n).t()


@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("signed", [False, True], ids=["nonnegative", "signed"])
def test_operator_norm_bound_is_an_upper_bound_of_the_spectral_norm(kind, signed) -> None:
    generator = torch.Generator().manual_seed(4)
    if kind == "conv":
        block, shape = PcDEQConv(3), (3, 5, 5)
        weight = torch.rand(3, 3, 3, 3, generator=generator, dtype=torch.float64)
    else:
        block, shape = PcDEQLinear(12), (12,)
        weight = torch.rand(12, 12, generator=generator, dtype=torch.float64)
    if signed:
        weight = weight - 0.5
    matrix = _dense_matrix(block, weight, shape)
    spectral = float(torch.linalg.matrix_norm(matrix, ord=2))
    bound = block.operator_norm_bound(weight)
    assert spectral <= bound
    # and of its transpose (the adjoint's linear map)
    assert float(torch.linalg.matrix_norm(matrix.t(), ord=2)) <= bound
    if not signed:  # nonnegative: the Perron root is at least the smallest row sum
        assert bound < 1.5 * spectral


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_refinement_error_bound_holds_against_float64(kind: str) -> None:
    cell_map, base = _cell_map(kind)
    f64 = PcDEQCellMap(cell_map.block, cell_map.u.double(), cell_map.weight.double())
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        offered = cell_map.refinement(base, torch.bfloat16)
        assert offered.error_bound is not None
        for scale in (1e-3, 1e-2, 1e-1):  # iterates near and far from the base
            z = (base + scale * torch.randn(base.shape, generator=generator)).clamp_min(0)
            out = offered.corrected(z, torch.empty_like(z))
            error = (out.double() - f64(z.double())).flatten(1).norm(dim=1)
            # beyond the bound only float32's own rounding of W base + u and of tanh
            float32_rounding = 1e-6 * f64(z.double()).flatten(1).norm(dim=1)
            assert (error <= offered.error_bound(z, None).double() + float32_rounding).all()
            assert (offered.error_bound(z, torch.empty_like(z)) > 0).all()


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_adjoint_refinement_error_bound_holds_against_float64(kind: str) -> None:
    cell_map, z_star = _cell_map(kind)
    step = cell_map.linearized_step(z_star)
    grad = torch.randn(z_star.shape, generator=torch.Generator().manual_seed(3))
    f64 = PcDEQCellMap(cell_map.block, cell_map.u.double(), cell_map.weight.double())
    adjoint64 = f64.linearized_step(z_star.double()).adjoint(grad.double())
    generator = torch.Generator().manual_seed(6)
    with torch.no_grad():
        base = step.adjoint(grad)(grad)
        offered = step.adjoint_refinement(grad)(base, torch.bfloat16, None)
        assert offered.error_bound is not None
        for scale in (1e-3, 1e-2, 1e-1):
            y = base + scale * torch.randn(base.shape, generator=generator)
            out = offered.corrected(y, torch.empty_like(y))
            exact = adjoint64(y.double())
            error = (out.double() - exact).flatten(1).norm(dim=1)
            float32_rounding = 1e-6 * exact.flatten(1).norm(dim=1)
            assert (error <= offered.error_bound(y, None).double() + float32_rounding).all()


def test_only_bounded_activations_offer_an_error_bound() -> None:
    # softsign's corrected images carry no bound: its float32 check evaluates f
    cell_map, base = _cell_map("conv", activation="softsign")
    with torch.no_grad():
        assert cell_map.refinement(base, torch.bfloat16).error_bound is None
        step = cell_map.linearized_step(base)
        grad = torch.ones_like(base)
        assert step.adjoint_refinement(grad)(base, torch.bfloat16, None).error_bound is None


def test_refine_iterate_certifies_the_last_iterate_with_one_more_correction() -> None:
    refinement, exact, base = _affine_refinement(rate=0.5, error_bound=1e-7)
    result = refine_iterate(refinement, 4, tol=TOL, max_iter=50)
    assert result is not None and result.residual is not None
    # the state is the corrected image of the last iterate z; the bound covers z's
    # float32 residual, and the answer itself is one contraction closer
    z = (result.state - refinement(None).image) / 0.5  # f(z) = 0.5 z + c, exactly here
    true_residual = (exact(z) - z).norm(dim=1) / exact(z).norm(dim=1)
    assert (result.residual >= true_residual - 1e-7).all()
    assert float(result.residual.max()) < TOL
    assert _worst(exact(result.state), result.state) < TOL


def test_refine_iterate_certifies_even_where_the_first_image_meets_tol() -> None:
    # without a bound this is left to plain iteration (see above); with one, the
    # float32 check becomes a correction
    refinement, _, _ = _affine_refinement(rate=1e-5, error_bound=1e-7)
    result = refine_iterate(refinement, 4, tol=TOL, max_iter=50)
    assert result is not None and result.corrections == 1
    assert float(result.residual.max()) < TOL


def _two_speed_refinement(slow_rate: float):
    """An exact affine refinement (error bound 0) whose rows 0 and 3, the ones the probe
    sees, contract at rate 0.5 and rows 1 and 2 at ``slow_rate``; and the probe's count
    of corrections (the first iterate meeting tol at rate 0.5)."""
    rate = torch.tensor([0.5, slow_rate, slow_rate, 0.5]).unsqueeze(1)
    c = torch.rand(4, 5, generator=torch.Generator().manual_seed(0)) + 1.0

    def refinement(rows):
        r, cc = (rate, c) if rows is None else (rate[rows], c[rows])

        def corrected(z, out):
            return out.copy_(r * z + cc)

        return Refinement(cc.clone(), corrected, lambda z, work: torch.zeros(z.shape[0]))

    z, needed = c.clone(), 0
    while _worst(0.5 * z + c, z) >= TOL:
        z, needed = 0.5 * z + c, needed + 1
    return refinement, needed


def test_a_missed_certified_check_is_retried_with_one_more_correction() -> None:
    # rows 1 and 2 contract a little slower: the first certified check misses for them
    # and the next passes
    refinement, needed = _two_speed_refinement(0.535)
    result = refine_iterate(refinement, 4, tol=TOL, max_iter=50)
    assert result is not None and bool((result.residual < TOL).all())
    assert result.corrections == needed + 2  # a miss, then the pass


def test_certified_checks_stop_after_their_attempts() -> None:
    # rows 1 and 2 far slower: both certified checks miss; the float32 solve takes over
    # from the last corrected image (see the fallback test below)
    refinement, needed = _two_speed_refinement(0.9)
    result = refine_iterate(refinement, 4, tol=TOL, max_iter=50)
    assert result is not None and result.corrections == needed + CERTIFY_ATTEMPTS
    assert not bool((result.residual[[1, 2]] < TOL).any())
    assert bool((result.residual[[0, 3]] < TOL).all())


def test_a_bound_too_loose_to_pass_leaves_the_check_to_float32() -> None:
    # the probe finds the bound alone above tol: no certified check is attempted
    refinement, exact, _ = _affine_refinement(rate=0.5, error_bound=1.0)
    result = refine_iterate(refinement, 4, tol=TOL, max_iter=50)
    assert result is not None and result.residual is None
    assert _worst(exact(result.state), result.state) < PROBE_MARGIN * TOL


def test_certified_solve_needs_one_float32_evaluation_and_is_within_tol() -> None:
    block, pre = _slow_block(refine=True)
    block64 = PcDEQConv(8, init_scale=0.05).double()
    block64.load_state_dict(block.state_dict())
    log = instrument(block)
    with torch.no_grad():
        z = block(pre)
        record = block.last_stats.forward
        f64 = PcDEQCellMap(block64, block64.injection(pre.double()), block64.weight)
        image = f64(z.double())
    assert record.all_converged and record.refine_iterations > 0
    # the one float32 evaluation of the whole batch is the refinement's at the warm state
    assert log.count("cell", torch.float32, batch=3) == 1
    assert log.count("correction", batch=3) == record.refine_iterations
    assert record.iterations == 1 + record.warm_iterations + 1 + record.refine_iterations
    # the answer's own residual, in float64, is within tol (and the record's bound,
    # which is of the iterate before it, above it)
    residual = (image - z.double()).flatten(1).norm(dim=1) / image.flatten(1).norm(dim=1)
    assert float(residual.max()) < TOL
    assert (record.residual.double() >= residual).all()
    assert (z >= 0).all()


def test_a_failed_certificate_falls_back_to_float32_checks(monkeypatch) -> None:
    block, pre = _slow_block(refine=True)
    offer = PcDEQCellMap.refinement

    def loose(self, base, dtype, rows=None):  # exact for the probe's rows, loose for all
        offered = offer(self, base, dtype, rows)
        if rows is not None:
            return Refinement(offered.image, offered.corrected, lambda z, work: 0 * z[:, 0, 0, 0])
        return Refinement(offered.image, offered.corrected, lambda z, work: torch.ones(z.shape[0]))

    monkeypatch.setattr(PcDEQCellMap, "refinement", loose)
    log = instrument(block)
    with torch.no_grad():
        z = block(pre)
    record = block.last_stats.forward
    assert record.all_converged and float(record.residual.max()) < TOL
    assert record.refine_iterations >= CERTIFY_ATTEMPTS  # both certified checks missed
    # the anchor and at least one float32 check after the corrections
    assert log.count("cell", torch.float32, batch=3) >= 2
    plain, _ = _slow_block(refine=False)
    with torch.no_grad():
        assert rel_err(z, plain(pre)) < 10 * TOL
