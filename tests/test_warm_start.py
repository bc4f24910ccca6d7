"""Mixed-precision warm start (issue 9): forced on and off, the ``"auto"`` rule, the
projection onto the orthant, iteration accounting, the failure policy, the stall stop."""

from __future__ import annotations

import pytest
import torch
from solver_zoo import dense_tanh
from speed_support import instrument, rel_err

import pcdeq_plugin as P
import pcdeq_plugin.warm_start as warm_start
from pcdeq_plugin.cell_map import PcDEQCellMap
from pcdeq_plugin.cells import PcDEQConv, PcDEQLinear
from pcdeq_plugin.implicit import solve_implicit
from pcdeq_plugin.maps import MIN_WARM_START_ELEMENTS, FixedPointMap
from pcdeq_plugin.warm_start import resolve_warm_start, warm_iterate

LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}
TOL = 1e-4


def _train_step(warm: str, activation: str, solver: str, seed: int = 0, refine: bool = False):
    """One forward/backward of a float32 conv block; its gradients, records and call log.

    The refinement after the warm phase is off unless asked for: these tests count the
    warm phase's evaluations (tests/test_warm_refine.py counts the corrections)."""
    torch.manual_seed(seed)
    config = P.SolverConfig(
        solver=solver,
        tol=TOL,
        max_iter=60,
        warm_start=warm,
        warm_refine=refine,
        on_failure="raise",
    )
    block = PcDEQConv(8, activation=activation, init_scale=0.02, config=config)
    log = instrument(block)
    pre = torch.randn(3, 8, 10, 10, requires_grad=True)
    z = block(pre)
    (z * torch.randn_like(z)).sum().backward()
    grads = [pre.grad, *(p.grad for p in block.parameters())]
    return z.detach(), grads, block.last_stats, log


@pytest.mark.parametrize("solver", ["fixed_point", "anderson"])
@pytest.mark.parametrize("activation", ["tanh", "sigmoid"])  # pcDEQ-1 and pcDEQ-2
@pytest.mark.parametrize("warm", ["bf16", "fp16"])
def test_forced_warm_start_gives_the_full_precision_answers(warm, activation, solver) -> None:
    z_off, grads_off, stats_off, _ = _train_step("off", activation, solver)
    z, grads, stats, log = _train_step(warm, activation, solver)
    low = LOW[warm]
    assert stats_off.forward.warm_iterations == stats_off.backward.warm_iterations == 0
    assert stats_off.forward.warm_dtype == ""
    for record, phase, tol_calls in (
        (stats.forward, "cell", lambda c: not c.grad_enabled),  # the solve, not the step
        (stats.backward, "adjoint", lambda c: True),
    ):
        # the per-sample test, flags and failure policy come from the float32 phase
        assert float(record.residual.max()) < TOL and record.all_converged
        assert record.residual.dtype == torch.float32
        assert record.warm_iterations > 0 and record.warm_dtype == str(low).split(".")[1]
        assert record.iterations <= record.max_iter == 60
        # iterations counts both phases: exactly the map's evaluations in each precision,
        # and the forward solve's first iteration from zero, sigma(u), which needs none
        calls = getattr(log, phase)
        assert sum(c.dtype == low for c in calls) == record.warm_iterations
        full = sum(c.dtype == torch.float32 and tol_calls(c) for c in calls)
        free = 1 if phase == "cell" else 0
        assert full == record.iterations - record.warm_iterations - free > 0
    # Both solves stop at a relative residual below tol, so each is within tol / (1 - q) of
    # the exact fixed point (q <= 0.8 here): the two differ by at most 2 tol / (1 - q) =
    # 10 tol. The gradients inherit that forward error through sigma'(a) and add their own
    # adjoint error of the same size: 20 tol. (Measured: 2e-5 and 6e-5.)
    assert rel_err(z, z_off) < 10 * TOL
    for got, want in zip(grads, grads_off):
        assert rel_err(got, want) < 20 * TOL


def test_forced_warm_start_on_a_plain_callable_runs_under_autocast() -> None:
    problem = dense_tanh(batch=4, n=6)
    stats = P.BlockStats("plain")
    config = P.SolverConfig(tol=1e-6, warm_start="bf16", on_failure="raise")
    z = solve_implicit(problem.map(), problem.zeros(), config, stats)
    ref = solve_implicit(problem.map(), problem.zeros(), config.replace(warm_start="off"))
    assert stats.forward.warm_iterations > 0 and stats.forward.warm_dtype == "bfloat16"
    assert z.dtype == torch.float32 and float(stats.forward.residual.max()) < 1e-6
    assert rel_err(z, ref) < 1e-5


class _ShiftedLowPrecisionMap(FixedPointMap):
    """``z -> z/2 + u``; its low-precision version is shifted by -0.02, so the warm phase
    ends below zero where ``u`` is small (a stand-in for rounding leaving the orthant)."""

    positive_concave = True

    def __init__(self, u: torch.Tensor) -> None:
        self.u = u
        self.inputs: list[torch.Tensor] = []

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        self.inputs.append(z.clone())
        return 0.5 * z + self.u

    def in_precision(self, dtype: torch.dtype):
        u = self.u.to(dtype)
        return lambda z: 0.5 * z + u - 0.02


def test_warm_state_is_projected_onto_the_orthant() -> None:
    u = torch.tensor([[1e-3, 1.0, 0.5], [0.25, 2e-3, 1.5]])
    f = _ShiftedLowPrecisionMap(u)
    stats = P.BlockStats("shifted")
    config = P.SolverConfig(tol=1e-6, warm_start="bf16", on_failure="raise")
    with torch.no_grad():
        z = solve_implicit(f, torch.zeros_like(u), config, stats)
    assert stats.forward.warm_iterations > 0
    start = f.inputs[0]  # the full-precision phase's start: the warm state, projected
    assert start.dtype == torch.float32
    assert bool((start >= 0).all())
    assert bool((start[u < 0.02] == 0).all())  # where the warm phase went negative
    assert bool((start[u > 0.02] > 0).all())
    # per-sample residual < 1e-6 relative to ||f(z)|| ~ 3, rate 1/2: error < 1e-5
    torch.testing.assert_close(z, 2 * u, rtol=0, atol=1e-5)


# -- "auto" ----------------------------------------------------------------------------


def _cell_map(block, state_shape, dtype=torch.float32) -> tuple[PcDEQCellMap, torch.Tensor]:
    block = block.to(dtype)
    u = torch.rand(state_shape, dtype=dtype)
    return PcDEQCellMap(block, u, block.weight.detach()), torch.zeros_like(u)


@pytest.mark.parametrize("fast", [True, False])
def test_auto_is_on_only_for_large_float32_pcdeq_states_on_fast_bf16(monkeypatch, fast) -> None:
    monkeypatch.setattr(warm_start, "has_fast_bf16", lambda device: fast)
    # large state (262,144 elements) of a compute-bound cell (32 x 3 x 3 = 288 MACs each)
    big, z_big = _cell_map(PcDEQConv(32), (8, 32, 32, 32))
    assert z_big.numel() == MIN_WARM_START_ELEMENTS
    assert resolve_warm_start("auto", z_big, big) == (torch.bfloat16 if fast else None)
    wide, z_wide = _cell_map(PcDEQLinear(256), (1024, 256))
    assert resolve_warm_start("auto", z_wide, wide) == (torch.bfloat16 if fast else None)
    off_cases = {
        "small state": _cell_map(PcDEQConv(32), (2, 32, 4, 4)),
        # multi-conv's third block at batch 64 (110,592 elements, 432 MACs each)
        "a state below the threshold": _cell_map(PcDEQConv(48), (64, 48, 6, 6)),
        "few channels (72 MACs per element)": _cell_map(PcDEQConv(8), (8, 8, 32, 32)),
        "float64 state": _cell_map(PcDEQConv(32), (2, 32, 32, 32), torch.float64),
        "plain callable": (lambda z: torch.tanh(z + 1.0), z_big),
    }
    for case, (fn, state) in off_cases.items():
        assert resolve_warm_start("auto", state, fn) is None, case
    for forced, dtype in LOW.items():  # forcing ignores the hardware and the map
        assert resolve_warm_start(forced, z_big, lambda z: z) == dtype
        assert resolve_warm_start(forced, z_big, big) == dtype
    assert resolve_warm_start("off", z_big, big) is None


@pytest.mark.parametrize("fast", [True, False])
def test_auto_reaches_the_solve_of_a_large_block(monkeypatch, fast) -> None:
    monkeypatch.setattr(warm_start, "has_fast_bf16", lambda device: fast)
    block = PcDEQConv(32, init_scale=0.01, config=P.SolverConfig(on_failure="raise"))
    assert block.config.warm_start == "auto"
    with torch.no_grad():
        block(torch.randn(8, 32, 32, 32))  # MIN_WARM_START_ELEMENTS
    record = block.last_stats.forward
    assert record.all_converged
    assert (record.warm_iterations > 0) == fast
    assert record.warm_dtype == ("bfloat16" if fast else "")


def test_fast_bf16_detection(monkeypatch) -> None:
    assert warm_start.has_fast_bf16("meta") is False
    if not torch.cuda.is_available():
        assert warm_start.has_fast_bf16("cuda") is False
    flags = {"_is_amx_tile_supported": False, "_is_avx512_bf16_supported": False}
    for name in flags:
        monkeypatch.setattr(torch.cpu, name, lambda name=name: flags[name], raising=False)
    cached = warm_start._cpu_has_fast_bf16  # the CPU's answer is asked once per process
    try:
        cached.cache_clear()
        assert warm_start.has_fast_bf16("cpu") is False
        for name in flags:
            flags[name] = True
            cached.cache_clear()
            assert warm_start.has_fast_bf16(torch.device("cpu")) is True
            flags[name] = False
    finally:
        cached.cache_clear()  # the real flags again for the tests that follow


def test_unknown_warm_start_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="warm_start 'bf32'.*auto, off, bf16, fp16"):
        P.SolverConfig(warm_start="bf32")
    with pytest.raises(ValueError, match="warm_start 'half'.*auto, off, bf16, fp16"):
        resolve_warm_start("half", torch.zeros(2, 3), lambda z: z)
    with pytest.raises(ValueError, match="warm_tol must be a positive finite number"):
        P.SolverConfig(warm_tol=0.0)


# -- caps and the failure policy -------------------------------------------------------


@pytest.mark.parametrize("max_iter", [1, 2, 3])
def test_warm_iterations_count_against_the_cap(max_iter: int) -> None:
    block = PcDEQConv(8, init_scale=0.05)
    block.config = P.SolverConfig(
        tol=1e-12, max_iter=max_iter, warm_start="bf16", on_failure="ignore"
    )
    log = instrument(block)
    with torch.no_grad():
        block(torch.randn(2, 8, 6, 6))
    record = block.last_stats.forward
    # both phases within the cap; from zero the first iteration is sigma(u), no evaluation
    # (except at max_iter = 1, where the solver alone takes the one iteration)
    free = 1 if max_iter > 1 else 0
    assert record.iterations == log.count("cell") + free == max_iter
    assert record.max_iter == max_iter and record.num_failed == 2
    assert 0 <= record.warm_iterations < max_iter  # the float32 phase always gets one


def test_failure_policy_fires_after_a_warm_start() -> None:
    block = PcDEQConv(8, init_scale=0.05, name="warm_block")
    pre = torch.randn(2, 8, 6, 6)
    block.config = P.SolverConfig(tol=1e-7, max_iter=3, warm_start="bf16", on_failure="raise")
    with pytest.raises(P.ConvergenceError, match="warm_block: forward solve .* after 3 iter"):
        block(pre)
    assert block.last_stats.forward.warm_iterations > 0
    block.config = block.config.replace(max_iter=100, backward_max_iter=3)
    z = block(pre.requires_grad_())
    with pytest.raises(P.ConvergenceError, match="warm_block: backward solve .* after 3 iter"):
        z.sum().backward()
    assert block.last_stats.backward.warm_iterations > 0
    block.config = block.config.replace(max_iter=3, on_failure="warn")
    with pytest.warns(P.ConvergenceWarning, match="warm_block: forward solve"):
        block(pre.detach())


# -- the warm phase itself -------------------------------------------------------------


def test_warm_iterate_stops_where_the_residual_floors() -> None:
    target = torch.tensor([[1.0, 2.0, 3.0]])
    calls: list[int] = []

    def floored(z: torch.Tensor) -> torch.Tensor:
        # an oscillation around the fixed point that shrinks by only 0.9 per iteration,
        # as rounding noise does: past a low precision's floor, iterating buys little
        calls.append(1)
        n = len(calls)
        return target * (1 + 0.01 * 0.9**n * (-1) ** n)

    _, k = warm_iterate(floored, torch.zeros(1, 3), tol=1e-8, max_iter=50, zero_start=True)
    assert k == len(calls) <= 5  # stopped at the floor (rate 0.9 > STALL_RATIO), not at 50

    # a contraction at rate 1/2 (< STALL_RATIO) is iterated on to the tolerance
    state, k = warm_iterate(lambda z: 0.5 * z + 1.0, torch.zeros(1, 3), tol=1e-6, max_iter=50)
    assert 15 < k < 50
    assert float((0.5 * state + 1.0 - state).abs().max() / 2.0) < 1e-6
