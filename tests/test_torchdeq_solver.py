"""The ``pcdeq`` solver on TorchDEQ's solver contract: shapes, stops, damping, refusals."""

from __future__ import annotations

import inspect

import pytest
import torch
from torchdeq import get_deq
from torchdeq.core import DEQSliced
from torchdeq.solver import fixed_point_iter
from torchdeq_support import PcCell, registered, torchdeq_registries  # noqa: F401

from pcdeq_plugin.torchdeq_bridge import SOLVER_OPTIONS, pcdeq_deq_kwargs, pcdeq_solver

# -- solver contract ---------------------------------------------------------------------


def test_signature_matches_torchdeq_contract() -> None:
    params = list(inspect.signature(pcdeq_solver).parameters)
    assert params[:6] == ["func", "x0", "max_iter", "tol", "stop_mode", "indexing"]
    assert (
        inspect.signature(pcdeq_solver).parameters["kwargs"].kind is inspect.Parameter.VAR_KEYWORD
    )


@pytest.mark.parametrize("shape", [(6,), (3, 5), (2, 3, 4, 4)], ids=["B", "BD", "BCHW"])
def test_shapes_and_info(shape: tuple[int, ...]) -> None:
    bsz = shape[0] if len(shape) >= 2 else shape[0]
    a = torch.rand(shape) * 0.5 + 0.1
    z, trajectory, info = pcdeq_solver(
        lambda z: torch.tanh(0.5 * z + a), torch.zeros(shape), 30, 1e-6, "abs", None
    )
    assert z.shape == torch.Size(shape) and not z.requires_grad
    assert trajectory == []
    assert set(info) >= {"abs_lowest", "rel_lowest", "abs_trace", "rel_trace", "nstep", "sradius"}
    for key in ("abs_lowest", "rel_lowest", "nstep", "pc_min"):
        assert info[key].shape == (bsz,), key
    assert info["abs_trace"].shape == (bsz, 31) and info["rel_trace"].shape == (bsz, 31)
    assert float(info["abs_lowest"].max()) < 1e-6
    assert torch.allclose(z, torch.tanh(0.5 * z + a), atol=1e-5)


def test_trajectory_is_padded_on_early_stop() -> None:
    a = torch.rand(4, 8) * 0.5 + 0.1
    z, trajectory, info = pcdeq_solver(
        lambda z: torch.tanh(0.2 * z + a), torch.zeros(4, 8), 100, 1e-6, "rel", [2, 50, 100]
    )
    stopped = int(info["nstep"].max())
    assert stopped < 50  # stopped early, yet one state per index
    assert len(trajectory) == 3
    assert torch.equal(trajectory[1], z) and torch.equal(trajectory[2], z)
    assert not torch.equal(trajectory[0], z)  # step 2 is genuinely the step-2 state
    assert info["rel_trace"].shape == (4, 101)


def test_stop_modes_and_unknown_mode() -> None:
    a = torch.rand(3, 5) + 0.5
    f = lambda z: torch.tanh(0.5 * z + 10 * a)  # noqa: E731
    _, _, info_abs = pcdeq_solver(f, torch.zeros(3, 5), 100, 1e-3, "abs")
    _, _, info_rel = pcdeq_solver(f, torch.zeros(3, 5), 100, 1e-3, "rel")
    assert float(info_abs["abs_lowest"].max()) < 1e-3
    assert float(info_rel["rel_lowest"].max()) < 1e-3
    with pytest.raises(ValueError, match="unknown stop_mode 'thompson'; available: abs, rel"):
        pcdeq_solver(f, torch.zeros(3, 5), 10, 1e-3, "thompson")
    for bad_tol in (0.0, -1e-3, float("nan")):
        with pytest.raises(ValueError, match="tol must be a positive finite number"):
            pcdeq_solver(f, torch.zeros(3, 5), 10, bad_tol, "rel")


def test_small_and_zero_budgets_make_progress() -> None:
    a = torch.full((2, 3), 0.5)
    f = lambda z: torch.tanh(0.5 * z + a)  # noqa: E731
    z0 = torch.zeros(2, 3)
    z_zero, _, info0 = pcdeq_solver(f, z0, 0, 1e-6, "abs", [1])
    assert torch.equal(z_zero, z0) and info0["abs_trace"].shape == (2, 1)
    z_one, traj, _ = pcdeq_solver(f, z0, 1, 1e-6, "abs", [1])
    assert torch.allclose(z_one, f(z0)) and len(traj) == 1
    z_two, _, info2 = pcdeq_solver(f, z0, 2, 1e-6, "abs")
    assert torch.allclose(z_two, f(f(z0)))  # unlike Anderson, max_iter < 3 iterates
    assert info2["nstep"].tolist() == [2.0, 2.0]


def test_solves_signed_linear_adjoint_without_clamping(float64) -> None:
    """The backward problem y = J^T y + g has signed solutions: no projection allowed."""
    torch.manual_seed(1)
    n = 6
    jt = torch.rand(n, n) * (0.5 / n)
    g = torch.randn(3, n)  # signed right-hand side
    y, _, info = pcdeq_solver(lambda y: y @ jt.T + g, torch.zeros(3, n), 200, 1e-12, "abs")
    exact = torch.linalg.solve(torch.eye(n) - jt, g.T).T
    assert (exact < 0).any()
    assert torch.allclose(y, exact, atol=1e-10)
    assert float(info["pc_min"].min()) < 0


def test_nan_never_counts_as_converged() -> None:
    f = lambda z: z + torch.tensor([[float("nan")], [1.0]])  # noqa: E731
    z, _, info = pcdeq_solver(f, torch.zeros(2, 1), 5, 1e-3, "abs")
    assert int(info["nstep"][0]) == 0  # sample 0 never improved: it keeps x0
    assert torch.isfinite(z).all()


def test_return_final_runs_every_step() -> None:
    a = torch.full((2, 3), 0.5)
    f = lambda z: torch.tanh(0.1 * z + a)  # noqa: E731
    _, _, info = pcdeq_solver(f, torch.zeros(2, 3), 25, 1e-3, "abs", return_final=True)
    assert info["nstep"].tolist() == [25.0, 25.0]


def test_shape_change_is_an_error() -> None:
    with pytest.raises(ValueError, match="changed the state shape"):
        pcdeq_solver(lambda z: z.sum(dim=1), torch.zeros(2, 3), 5, 1e-3, "abs")
    with pytest.raises(TypeError, match="x0 must be a torch.Tensor"):
        pcdeq_solver(lambda z: z, [torch.zeros(2, 3)], 5, 1e-3, "abs")
    with pytest.raises(ValueError, match="max_iter must be an integer >= 0"):
        pcdeq_solver(lambda z: z, torch.zeros(2, 3), -1, 1e-3, "abs")


def test_pcdeq_properties_nonnegative_unique_geometric(float64) -> None:
    torch.manual_seed(2)
    cell = PcCell(5, 12)
    x = torch.randn(4, 5)
    u = cell.injection(x).detach()
    f = lambda z: cell(z, u).detach()  # noqa: E731
    z_a, _, info = pcdeq_solver(f, torch.zeros(4, 12), 200, 1e-10, "abs")
    z_b, _, _ = pcdeq_solver(f, torch.full((4, 12), 3.0), 200, 1e-10, "abs")
    assert float(info["pc_min"].min()) > 0  # iterates from 0 stay in the positive orthant
    assert torch.allclose(z_a, z_b, atol=1e-6)  # unique fixed point
    steps = int(info["nstep"].max())
    trace = info["abs_trace"][:, 1 : min(steps, 8) + 1]  # well above rounding level
    assert float(trace[:, -1].max()) > 1e-12
    ratios = trace[:, 1:] / trace[:, :-1]
    assert float(ratios.max()) < 0.9  # geometric decay


# -- damping (issue 10, item 6) ----------------------------------------------------------------


def test_tau_damps_the_iteration_exactly(float64) -> None:
    a = torch.rand(3, 4) + 0.2
    f = lambda z: torch.tanh(0.6 * z + a)  # noqa: E731
    z0 = torch.zeros(3, 4)
    z_one, _, _ = pcdeq_solver(f, z0, 1, 1e-12, "abs", tau=0.25)
    assert torch.allclose(z_one, 0.75 * z0 + 0.25 * f(z0))
    z_two, _, _ = pcdeq_solver(f, z0, 2, 1e-12, "abs", tau=0.25)
    assert torch.allclose(z_two, 0.75 * z_one + 0.25 * f(z_one))


def test_damped_solve_reaches_the_same_fixed_point_more_slowly(float64) -> None:
    torch.manual_seed(5)
    cell = PcCell(5, 12)
    u = cell.injection(torch.randn(4, 5)).detach()
    f = lambda z: cell(z, u).detach()  # noqa: E731
    z_plain, _, info_plain = pcdeq_solver(f, torch.zeros(4, 12), 400, 1e-11, "abs")
    z_damped, _, info_damped = pcdeq_solver(f, torch.zeros(4, 12), 400, 1e-11, "abs", tau=0.5)
    assert torch.allclose(z_plain, z_damped, atol=1e-9)  # same unique fixed point
    assert float(info_damped["pc_min"].min()) > 0  # still inside the positive orthant
    assert int(info_damped["nstep"].max()) > int(info_plain["nstep"].max())
    # the residual reported is that of z = f(z), not of the damped step
    assert float((f(z_damped) - z_damped).norm(dim=1).max()) < 1e-11


@pytest.mark.usefixtures("registered")
def test_tau_through_torchdeq_solver_kwargs() -> None:
    a = torch.rand(3, 4) + 0.2
    deq = get_deq(pcdeq_deq_kwargs(f_solver="pcdeq", f_tol=1e-9, f_stop_mode="abs", f_max_iter=300))
    deq.eval()
    f = lambda z: torch.tanh(0.5 * z + a)  # noqa: E731
    (z_plain,), info_plain = deq(f, torch.zeros(3, 4))
    (z_damped,), info_damped = deq(f, torch.zeros(3, 4), solver_kwargs={"tau": 0.3})
    assert torch.allclose(z_plain, z_damped, atol=1e-7)
    assert int(info_damped["nstep"].max()) > 2 * int(info_plain["nstep"].max())


def test_tau_matches_torchdeq_fixed_point_iter_iterates() -> None:
    """Same damped iterates as TorchDEQ's own solver over a fixed number of steps."""
    a = torch.rand(2, 5) + 0.1
    f = lambda z: torch.tanh(0.7 * z + a)  # noqa: E731
    ours, _, _ = pcdeq_solver(f, torch.zeros(2, 5), 7, 1e-30, "abs", tau=0.4, return_final=True)
    theirs, _, _ = fixed_point_iter(
        f, torch.zeros(2, 5), 7, 1e-30, "abs", tau=0.4, return_final=True
    )
    assert torch.allclose(ours, theirs, atol=1e-6)


@pytest.mark.parametrize("tau", [0.0, -0.5, 1.5, float("nan"), True, "0.5"])
def test_tau_outside_the_guarantee_is_refused(tau) -> None:
    with pytest.raises(ValueError, match=r"tau must be a damping factor in \(0, 1\]"):
        pcdeq_solver(lambda z: z, torch.zeros(2, 3), 5, 1e-3, "abs", tau=tau)


def test_damping_is_documented_as_keeping_the_guarantee() -> None:
    doc = inspect.getdoc(pcdeq_solver)
    assert "(1 - tau) z + tau func(z)" in doc and "positive concave" in doc


# -- options it would ignore (issue 10, item 6) -------------------------------------------------


def test_unknown_options_are_refused_listing_what_is_honoured() -> None:
    with pytest.raises(TypeError) as info:
        pcdeq_solver(lambda z: z, torch.zeros(2, 3), 5, 1e-3, "abs", m=6, beta=1.0)
    message = str(info.value)
    assert "'beta', 'm'" in message
    assert "honours: max_iter, tol, stop_mode, indexing, tau, return_final" in message
    assert set(SOLVER_OPTIONS) <= set(inspect.signature(pcdeq_solver).parameters)


@pytest.mark.usefixtures("registered")
def test_unknown_solver_kwargs_through_torchdeq_are_refused() -> None:
    deq = get_deq(f_solver="pcdeq", b_solver="pcdeq")
    with pytest.raises(TypeError, match="does not support the option.*'ls'"):
        deq(lambda z: torch.tanh(z + 1), torch.zeros(2, 3), solver_kwargs={"ls": True})


# -- multi-tensor states (issue 10, item 7) -------------------------------------------------------


@pytest.mark.parametrize("container", [tuple, list])
def test_tuple_or_list_state_message_is_accurate(container) -> None:
    with pytest.raises(TypeError) as info:
        pcdeq_solver(lambda z: z, container([torch.zeros(2, 3), torch.zeros(2, 1)]), 5, 1e-3)
    message = str(info.value)
    assert f"got a {container.__name__} of 2 states" in message
    assert "no_stat=True" in message and "no_stat=False" in message
    assert "always" not in message


@pytest.mark.usefixtures("registered")
def test_no_stat_core_passes_a_list_and_gets_the_accurate_message() -> None:
    """TorchDEQ's ``DEQSliced(no_stat=True)`` does hand a custom solver the list itself."""
    deq = DEQSliced(f_solver="pcdeq", no_stat=True)
    states = [torch.zeros(2, 3), torch.zeros(2, 2)]
    with pytest.raises(TypeError, match="got a list of 2 states.*no_stat=True"):
        deq(lambda a, b: (torch.tanh(a + 1), torch.tanh(b + 1)), states)
    # the remedy the message names works
    deq = DEQSliced(f_solver="pcdeq", no_stat=False)
    (z,), _ = deq(lambda a, b: (torch.tanh(a + 1), torch.tanh(b + 1)), states)
    assert [t.shape for t in z] == [(2, 3), (2, 2)]
