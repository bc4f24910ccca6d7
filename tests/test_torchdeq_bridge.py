"""Conformance of the TorchDEQ bridge (pcdeq_plugin.torchdeq_bridge) with TorchDEQ 0.1.0."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
import torch
import torchdeq
import torchdeq.core
import torchdeq.norm.base_norm
import torchdeq.solver
from torchdeq import get_deq
from torchdeq_support import PcCell, registered, torchdeq_registries  # noqa: F401

import pcdeq_plugin
from pcdeq_plugin.torchdeq_bridge import (
    PcNonnegNorm,
    TorchDEQRegistrationError,
    add_pcdeq_args,
    pcdeq_defaults,
    pcdeq_deq_kwargs,
    pcdeq_solver,
)

# -- inside TorchDEQ -----------------------------------------------------------------------


@pytest.mark.parametrize("core", ["sliced", "indexing"])
@pytest.mark.parametrize("grad", ["ift", "phantom"])
@pytest.mark.parametrize("b_solver", ["fixed_point_iter", "pcdeq"])
@pytest.mark.usefixtures("registered")
def test_cores_gradients_modes(core: str, grad: str, b_solver: str) -> None:
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


@pytest.mark.usefixtures("registered")
def test_tuple_state_through_torchdeq() -> None:
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


@pytest.mark.usefixtures("registered")
def test_ift_gradient_matches_exact_implicit_gradient(float64) -> None:
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


# -- the optional core -----------------------------------------------------------------------


@pytest.mark.usefixtures("registered")
def test_core_starts_in_the_orthant_and_matches_sliced() -> None:
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


@pytest.mark.usefixtures("registered")
def test_core_warns_about_orthant_leaving_solvers() -> None:
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


@pytest.mark.usefixtures("registered")
def test_deq_kwargs_copies_and_validates() -> None:
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
        ({"f_stop_mode": "max"}, "unknown f_stop_mode 'max'; available: abs, rel"),
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


@pytest.mark.usefixtures("registered")
def test_defaults_are_valid() -> None:
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
