"""Conformance of the TorchDEQ bridge (pcdeq_plugin.torchdeq_bridge) with TorchDEQ 0.1.0."""

from __future__ import annotations

import argparse
import inspect
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import torchdeq
import torchdeq.core
import torchdeq.norm.base_norm
import torchdeq.solver
from torch import nn
from torchdeq import apply_norm, get_deq, remove_norm, reset_norm
from torchdeq.norm.weight_norm import WeightNorm

import pcdeq_plugin
from pcdeq_plugin.torchdeq_bridge import (
    PcNonnegNorm,
    TorchDEQRegistrationError,
    add_pcdeq_args,
    pcdeq_defaults,
    pcdeq_deq_kwargs,
    pcdeq_solver,
)


@pytest.fixture(autouse=True)
def torchdeq_registries():
    """Snapshot TorchDEQ's process-global registries and restore them after each test."""
    tables = (
        torchdeq.solver._solvers,
        torchdeq.core._core,
        torchdeq.norm.base_norm._norm_class,
        WeightNorm._target_modules,
        PcNonnegNorm._target_modules,
    )
    saved = [dict(table) for table in tables]
    yield
    for table, snapshot in zip(tables, saved):
        table.clear()
        table.update(snapshot)


@pytest.fixture
def registered() -> dict[str, str]:
    return pcdeq_plugin.register()


class PcCell(nn.Module):
    """A pcDEQ-1 cell written TorchDEQ-style: tanh(W z + softplus(U x, beta=5))."""

    def __init__(self, d_in: int, width: int, scale: float = 0.3) -> None:
        super().__init__()
        self.inj = nn.Linear(d_in, width)
        self.W = nn.Linear(width, width, bias=False)
        with torch.no_grad():
            self.W.weight.uniform_(0.0, scale / width)

    def injection(self, x: torch.Tensor) -> torch.Tensor:
        return F.softplus(self.inj(x), beta=5.0)

    def forward(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.W(z) + u)


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
        lambda z: torch.tanh(0.5 * z + a), torch.zeros(shape), 30, 1e-6, "abs", None, unknown_opt=1
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
    with pytest.raises(ValueError, match="unknown stop_mode 'thompson'; choose one of abs, rel"):
        pcdeq_solver(f, torch.zeros(3, 5), 10, 1e-3, "thompson")
    for bad_tol in (0.0, -1e-3, float("nan")):
        with pytest.raises(ValueError, match="tol must be a positive number"):
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


# -- inside TorchDEQ -----------------------------------------------------------------------


@pytest.mark.parametrize("core", ["sliced", "indexing"])
@pytest.mark.parametrize("grad", ["ift", "phantom"])
@pytest.mark.parametrize("b_solver", ["fixed_point_iter", "pcdeq"])
def test_cores_gradients_modes(registered, core: str, grad: str, b_solver: str) -> None:
    cell = PcCell(5, 8)
    x = torch.randn(3, 5)
    calls: list[int] = []
    deq = get_deq(
        pcdeq_deq_kwargs(
            core=core,
            f_solver="pcdeq",
            b_solver=b_solver,
            f_stop_mode="rel",
            f_tol=1e-6,
            f_max_iter=60,
            ift=grad == "ift",
            n_states=2 if core == "indexing" else 1,
        )
    )
    u = cell.injection(x)
    z_out, info = deq(lambda z: cell(z, u), torch.zeros(3, 8), backward_writer=calls.append)
    assert len(z_out) == (2 if core == "indexing" else 1)
    z_out[-1].sum().backward()
    assert cell.W.weight.grad is not None and float(cell.W.weight.grad.abs().sum()) > 0
    assert cell.inj.weight.grad is not None
    assert len(calls) == (1 if grad == "ift" else 0)  # IFT survived the early stop
    assert float(info["rel_lowest"].max()) < 1e-6
    deq.eval()
    z_eval, info_eval = deq(lambda z: cell(z, u.detach()), torch.zeros(3, 8))
    assert torch.allclose(z_eval[-1], z_out[-1].detach(), atol=1e-5)
    assert info_eval["nstep"].shape == (3,)


def test_tuple_state_through_torchdeq(registered) -> None:
    """TorchDEQ flattens tuple states to [B, sum D] for a custom solver; shapes come back."""
    a = torch.rand(3, 4) + 0.1
    b = torch.rand(3, 2, 2) + 0.1
    scale = torch.tensor(0.3, requires_grad=True)

    def f(z1: torch.Tensor, z2: torch.Tensor):
        return torch.tanh(scale * z1 + a), torch.tanh(scale * z2 + b + z1[:, :2, None] * 0.1)

    deq = get_deq(pcdeq_deq_kwargs(f_solver="pcdeq", b_solver="pcdeq", f_tol=1e-8, ift=True))
    (z,), info = deq(f, (torch.zeros(3, 4), torch.zeros(3, 2, 2)))
    z1, z2 = z
    assert z1.shape == (3, 4) and z2.shape == (3, 2, 2)
    assert info["nstep"].shape == (3,)
    f1, f2 = f(z1, z2)
    assert torch.allclose(f1, z1, atol=1e-6) and torch.allclose(f2, z2, atol=1e-6)
    (z1.sum() + z2.sum()).backward()
    assert scale.grad is not None and float(scale.grad) > 0


def test_ift_gradient_matches_exact_implicit_gradient(registered, float64) -> None:
    torch.manual_seed(3)
    cell = PcCell(4, 6, scale=0.8)
    x = torch.randn(3, 4)
    target = torch.randn(3, 6)
    deq = get_deq(
        pcdeq_deq_kwargs(
            pcdeq_defaults(), f_tol=1e-13, f_stop_mode="abs", b_tol=1e-13, f_max_iter=400
        )
    )
    u = cell.injection(x)
    (z,), _ = deq(lambda z: cell(z, u), torch.zeros(3, 6))
    ((z - target) ** 2).sum().backward()
    grad_w = cell.W.weight.grad.clone()

    # exact: dL/dW = sum_b (diag(s_b) (I - diag(s_b) W)^-T dL/dz_b) z_b^T
    zs = z.detach()
    w = cell.W.weight.detach()
    s = 1 - torch.tanh(zs @ w.T + u.detach()) ** 2
    exact = torch.zeros_like(w)
    for b in range(3):
        jac = s[b, :, None] * w
        adj = torch.linalg.solve((torch.eye(6) - jac).T, 2 * (zs[b] - target[b]))
        exact += torch.outer(s[b] * adj, zs[b])
    assert torch.allclose(grad_w, exact, rtol=1e-8, atol=1e-12)


# -- the nonnegativity norm -----------------------------------------------------------------


@pytest.mark.parametrize("parametrization", ["projection", "softplus"])
def test_norm_apply_reset_remove_and_nonneg_after_steps(registered, parametrization) -> None:
    torch.manual_seed(4)
    cell = PcCell(5, 8)
    nn.init.normal_(cell.W.weight)  # signed start: the norm must make it nonnegative
    apply_norm(cell, "pc_nonneg", filter_out=["inj"], pc_norm_param=parametrization)
    assert hasattr(cell.W, "weight_v") and "weight" not in cell.W._parameters
    assert "weight" in cell.inj._parameters  # filtered out: untouched
    assert float(cell.W.weight.detach().min()) >= 0
    deq = get_deq(pcdeq_deq_kwargs(f_solver="pcdeq", f_stop_mode="rel", ift=True))
    opt = torch.optim.SGD(cell.parameters(), lr=5.0)  # large steps push v below zero
    x = torch.randn(4, 5)
    for _ in range(3):
        reset_norm(cell)
        assert float(cell.W.weight.detach().min()) >= 0
        (z,), _ = deq(lambda z: cell(z, cell.injection(x)), torch.zeros(4, 8))
        opt.zero_grad()
        (-z.sum()).backward()
        opt.step()
    reset_norm(cell)
    weight = cell.W.weight.detach()
    assert float(weight.min()) >= 0 and torch.isfinite(weight).all()
    if parametrization == "projection":
        assert float(cell.W.weight_v.detach().min()) >= 0
        assert float(cell.W.weight_g.detach().min()) >= 0
    remove_norm(cell)
    assert isinstance(cell.W._parameters["weight"], nn.Parameter)
    assert float(cell.W.weight.detach().min()) >= 0
    assert not hasattr(cell.W, "weight_v") and not hasattr(cell.W, "_deq_norm")


def test_projection_guard_has_no_nan_for_a_zero_row(registered) -> None:
    layer = nn.Linear(4, 3, bias=False)
    apply_norm(layer, "pc_nonneg")
    with torch.no_grad():
        layer.weight_v[1] = -1.0  # a whole row projected to zero
    reset_norm(layer)
    assert torch.isfinite(layer.weight).all()
    assert torch.equal(layer.weight[1], torch.zeros(4))


def test_norm_targets_and_no_pollution(registered) -> None:
    assert WeightNorm._target_modules is not PcNonnegNorm._target_modules
    before = dict(WeightNorm._target_modules)

    class MyLinear(nn.Linear):
        pass

    torchdeq.register_norm_module(MyLinear, "pc_nonneg", names="weight", dims=0)
    assert MyLinear in PcNonnegNorm._target_modules
    assert WeightNorm._target_modules == before
    model = nn.Sequential(MyLinear(3, 3), nn.Conv2d(2, 2, 3), nn.ConvTranspose2d(2, 2, 3))
    apply_norm(model, "pc_nonneg")
    for module in model:
        assert hasattr(module, "_deq_norm") and float(module.weight.detach().min()) >= 0


def test_norm_errors() -> None:
    with pytest.raises(ValueError, match="unknown pc_nonneg parametrization 'exp'; choose one of"):
        PcNonnegNorm.apply(nn.Linear(2, 2), parametrization="exp")
    with pytest.raises(TypeError, match="does not know which parameters of GRU"):
        PcNonnegNorm.apply(nn.GRU(2, 2))
    layer = nn.Linear(2, 2)
    PcNonnegNorm.apply(layer)
    with pytest.raises(ValueError, match="Linear.weight is not a parameter .is a norm already"):
        PcNonnegNorm.apply(layer)


# -- the optional core -----------------------------------------------------------------------


def test_core_starts_in_the_orthant_and_matches_sliced(registered) -> None:
    cell = PcCell(5, 8)
    x = torch.randn(3, 5)
    u = cell.injection(x).detach()
    config = {"f_solver": "pcdeq", "f_stop_mode": "rel", "f_tol": 1e-6, "f_max_iter": 100}
    pc_deq = get_deq(pcdeq_deq_kwargs(config, core="pcdeq"))
    assert isinstance(pc_deq, torchdeq.core.DEQSliced) and type(pc_deq).__name__ == "PcDEQCore"
    seen: list[torch.Tensor] = []

    def f(z: torch.Tensor) -> torch.Tensor:
        seen.append(z.detach().clone())
        return cell(z, u)

    negative = -torch.ones(3, 8)
    (z_pc,), info = pc_deq(f, negative)
    assert float(seen[0].min()) >= 0  # the solve started from max(z_init, 0)
    assert float(info["pc_min"].min()) > 0
    (z_ref,), _ = get_deq(pcdeq_deq_kwargs(config))(lambda z: cell(z, u), torch.zeros(3, 8))
    assert torch.allclose(z_pc, z_ref, atol=1e-5)
    (z_kw,), _ = pc_deq(lambda z: cell(z, u), z_star=negative)  # the parent's keyword
    assert torch.allclose(z_kw, z_ref, atol=1e-5)
    with pytest.raises(TypeError, match="needs an initial state"):
        pc_deq(lambda z: cell(z, u))


def test_core_warns_about_orthant_leaving_solvers(registered) -> None:
    with pytest.warns(RuntimeWarning, match="f_solver='anderson'.*may leave"):
        get_deq(core="pcdeq", f_solver="anderson")


# -- registration hygiene --------------------------------------------------------------------


def test_register_is_idempotent_and_public() -> None:
    first = pcdeq_plugin.register()
    assert first == {"solver": "pcdeq", "norm": "pc_nonneg", "core": "pcdeq"}
    assert pcdeq_plugin.register() == first
    assert torchdeq.solver.get_solver("pcdeq") is pcdeq_solver
    assert torchdeq.norm.base_norm._norm_class["pc_nonneg"] is PcNonnegNorm
    deq = get_deq(f_solver="pcdeq", b_solver="pcdeq")
    assert deq.f_solver is pcdeq_solver and deq.b_solver is pcdeq_solver


def test_register_recognises_its_entries_after_a_reload(monkeypatch) -> None:
    def older_copy(*args, **kwargs):  # what a reloaded module's solver looks like
        return None

    older_copy.__pcdeq_bridge__ = True
    monkeypatch.setitem(torchdeq.solver._solvers, "pcdeq", older_copy)
    pcdeq_plugin.register()
    assert torchdeq.solver._solvers["pcdeq"] is pcdeq_solver


def test_name_clash_is_refused_naming_the_entry() -> None:
    def their_solver(func, x0, **kwargs):
        return x0, [], {}

    torchdeq.solver.register_solver("pcdeq", their_solver)
    with pytest.raises(TorchDEQRegistrationError, match="their_solver.*not pcdeq-plugin's"):
        pcdeq_plugin.register()
    assert torchdeq.solver._solvers["pcdeq"] is their_solver
    assert "pc_nonneg" not in torchdeq.norm.base_norm._norm_class  # all or nothing
    assert pcdeq_plugin.register("pcdeq_fp")["solver"] == "pcdeq_fp"
    assert pcdeq_plugin.register(overwrite=True)["solver"] == "pcdeq"
    assert torchdeq.solver._solvers["pcdeq"] is pcdeq_solver


def test_norm_name_clash_is_refused() -> None:
    class TheirNorm:
        _target_modules: dict = {}

    torchdeq.register_norm("pc_nonneg", TheirNorm)
    with pytest.raises(TorchDEQRegistrationError, match="norm 'pc_nonneg'.*TheirNorm"):
        pcdeq_plugin.register()
    assert "pcdeq" not in torchdeq.solver._solvers


def test_core_name_clash_is_refused() -> None:
    torchdeq.core.register_deq("pcdeq", torchdeq.core.DEQIndexing)
    with pytest.raises(TorchDEQRegistrationError, match="core 'pcdeq'.*DEQIndexing"):
        pcdeq_plugin.register()
    assert "pcdeq" not in torchdeq.solver._solvers


@pytest.mark.parametrize("name", ["anderson", "fixed_point_iter", "sliced"])
def test_builtin_names_are_never_replaced(name: str) -> None:
    original = torchdeq.solver._solvers.get(name)
    with pytest.raises(TorchDEQRegistrationError, match="built-in (solver|core)"):
        pcdeq_plugin.register(name, overwrite=True)
    assert torchdeq.solver._solvers.get(name) is original
    with pytest.raises(TorchDEQRegistrationError, match="built-in norm"):
        pcdeq_plugin.register(norm_name="weight_norm", overwrite=True)


def test_torchdeq_not_importable(monkeypatch) -> None:
    for module in [m for m in sys.modules if m == "torchdeq" or m.startswith("torchdeq.")]:
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError, match=r"pip install 'torchdeq==0.1.0'"):
        pcdeq_plugin.register()
    with pytest.raises(ImportError, match="torchdeq"):
        add_pcdeq_args(argparse.ArgumentParser())


# -- configuration helpers ----------------------------------------------------------------------


def test_add_pcdeq_args_accepts_registered_solvers() -> None:
    parser = add_pcdeq_args(argparse.ArgumentParser())
    args = parser.parse_args(
        ["--f_solver", "pcdeq", "--b_solver", "pcdeq", "--norm_type", "pc_nonneg", "--pc_beta", "2"]
    )
    assert (args.f_solver, args.b_solver, args.norm_type) == ("pcdeq", "pcdeq", "pc_nonneg")
    assert args.pc_beta == 2.0 and args.pc_norm_param == "projection"
    assert args.pc_activation == "tanh"
    deq = get_deq(pcdeq_deq_kwargs(args))
    assert deq.b_solver is pcdeq_solver
    # --pc_activation reads the activation registry at parse time
    assert parser.parse_args(["--pc_activation", "softsign"]).pc_activation == "softsign"


def test_add_pcdeq_args_sees_later_registrations() -> None:
    parser = add_pcdeq_args(argparse.ArgumentParser())
    pcdeq_plugin.register("pcdeq_late")
    assert parser.parse_args(["--b_solver", "pcdeq_late"]).b_solver == "pcdeq_late"


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--b_solver", "nope"], "invalid choice: 'nope'"),
        (["--f_stop_mode", "thompson"], "invalid choice: 'thompson'"),
        (["--pc_norm_param", "exp"], "invalid choice: 'exp'"),
        (["--pc_activation", "sigmoidd"], "invalid choice: 'sigmoidd'"),
    ],
)
def test_add_pcdeq_args_rejects_unknown_values(argv, needle, capsys) -> None:
    parser = add_pcdeq_args(argparse.ArgumentParser())
    with pytest.raises(SystemExit) as info:
        parser.parse_args(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert needle in err
    if argv[0] == "--b_solver":
        assert "'pcdeq'" in err and "'anderson'" in err  # the choices are listed
    if argv[0] == "--pc_activation":
        assert "'sigmoid'" in err and "'tanh'" in err


def test_deq_kwargs_copies_and_validates(registered) -> None:
    user = {"f_solver": "pcdeq", "lr": 0.1, "epochs": 3}  # unrelated user keys are fine
    config = pcdeq_deq_kwargs(user, core="indexing", ift=True)
    get_deq(config)
    assert user == {"f_solver": "pcdeq", "lr": 0.1, "epochs": 3}  # caller's dict untouched
    ns = argparse.Namespace(f_solver="pcdeq")
    get_deq(pcdeq_deq_kwargs(ns, f_max_iter=7))
    assert vars(ns) == {"f_solver": "pcdeq"}
    wrapped = torchdeq.utils.config.DEQConfig({"f_solver": "pcdeq"})
    assert pcdeq_deq_kwargs(wrapped, ift=True) == {"f_solver": "pcdeq", "ift": True}
    assert wrapped.config == {"f_solver": "pcdeq"}
    with pytest.raises(TypeError, match="args must be a dict, an argparse.Namespace"):
        pcdeq_deq_kwargs(["f_solver", "pcdeq"])


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"stop_mode": "rel"}, "'stop_mode' (TorchDEQ reads 'f_stop_mode' and 'b_stop_mode')"),
        ({"f_anderson_m": 5}, "'f_anderson_m'"),
        ({"f_max_iters": 5}, "did you mean 'f_max_iter'"),
        ({"no_stat": True}, "get_deq ignores it"),
    ],
)
def test_deq_kwargs_unknown_keys(kwargs, needle) -> None:
    with pytest.raises(TypeError, match="unknown TorchDEQ config key") as info:
        pcdeq_deq_kwargs(**kwargs)
    assert needle in str(info.value)
    with pytest.raises(TypeError):  # the same keys hidden in a user's dict are caught too
        pcdeq_deq_kwargs(dict(kwargs))


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"f_stop_mode": "max"}, "f_stop_mode must be one of abs, rel"),
        ({"f_solver": "nope"}, "f_solver='nope' is not a registered TorchDEQ solver"),
        ({"core": "deep"}, "core='deep' is not a registered TorchDEQ core"),
        ({"b_solver": "simple_fixed_point_iter", "ift": True}, "crashes under implicit"),
        ({"f_tol": -1e-3}, "f_tol must be a positive finite number, got -0.001"),
        ({"b_tol": float("nan")}, "b_tol must be a positive finite number, got nan"),
        ({"f_tol": "1e-4"}, "f_tol must be a positive finite number, got '1e-4'"),
        ({"f_max_iter": 0}, "f_max_iter must be an integer >= 1, got 0"),
        ({"b_max_iter": 2.5}, "b_max_iter must be an integer >= 1, got 2.5"),
        ({"eval_f_max_iter": -1}, "eval_f_max_iter must be an integer >= 0, got -1"),
    ],
)
def test_deq_kwargs_bad_values(kwargs, needle) -> None:
    with pytest.raises(ValueError) as info:
        pcdeq_deq_kwargs(**kwargs)
    assert needle in str(info.value)


def test_defaults_are_valid(registered) -> None:
    config = pcdeq_deq_kwargs(pcdeq_defaults())
    deq = get_deq(config)
    assert deq.f_solver is pcdeq_solver and deq.b_solver is pcdeq_solver
    assert deq.f_stop_mode == "rel"


def test_importing_registers_nothing() -> None:
    """Neither ``import pcdeq_plugin`` nor importing the bridge touches TorchDEQ's registries."""
    code = (
        "import sys, pcdeq_plugin; assert 'torchdeq' not in sys.modules, 'torchdeq imported'; "
        "import pcdeq_plugin.torchdeq_bridge, torchdeq.solver, torchdeq.norm.base_norm as n; "
        "print('pcdeq' in torchdeq.solver._solvers, 'pc_nonneg' in n._norm_class)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]
