"""A TorchDEQ client, written the way TorchDEQ's documentation writes a model, using pcDEQ.

``get_deq(...)``, ``apply_norm(...)``, ``reset_norm`` at the top of ``forward``, a functor
``f = lambda z: layer(z, u)`` and ``z_out, info = deq(f, z0)``: after
``pcdeq_plugin.register()`` only names change (``f_solver='pcdeq'``, ``b_solver='pcdeq'``,
``norm_type 'pc_nonneg'``). The client trains a few steps side by side with our native
layer (:class:`pcdeq_plugin.PcDEQLinear`) from the same weights and must reach the same
fixed points and the same gradients.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

torchdeq = pytest.importorskip("torchdeq")

from torchdeq import apply_norm, get_deq, reset_norm  # noqa: E402

import pcdeq_plugin  # noqa: E402
from pcdeq_plugin import PcDEQLinear, SolverConfig  # noqa: E402
from pcdeq_plugin.torchdeq_bridge import pcdeq_defaults, pcdeq_deq_kwargs  # noqa: E402

D_IN, WIDTH, CLASSES, BATCH = 12, 10, 3, 6


@pytest.fixture
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture
def torchdeq_registries():
    tables = (torchdeq.solver._solvers, torchdeq.norm.base_norm._norm_class)
    saved = [dict(t) for t in tables]
    yield
    for table, snapshot in zip(tables, saved):
        table.clear()
        table.update(snapshot)


# -- the client, TorchDEQ style ---------------------------------------------------------------


class PcDEQLayer(nn.Module):
    """``g(z) = tanh(W z + u)``; ``W`` nonnegative through TorchDEQ's norm mechanism."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.W = nn.Linear(width, width, bias=False)

    def forward(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.W(z) + u)


class TorchDEQClient(nn.Module):
    def __init__(self, args: dict) -> None:
        super().__init__()
        self.inj = nn.Linear(D_IN, WIDTH)
        self.layer = PcDEQLayer(WIDTH)
        self.head = nn.Linear(WIDTH, CLASSES)
        self.deq = get_deq(args)
        apply_norm(self.layer, "pc_nonneg")

    def forward(self, x: torch.Tensor):
        reset_norm(self.layer)  # recompute (and project) W once per forward
        u = F.softplus(self.inj(x), beta=5.0)  # pcDEQ-1: strictly positive injection
        f = lambda z: self.layer(z, u)  # noqa: E731
        z0 = torch.zeros(x.shape[0], WIDTH)
        z_out, info = self.deq(f, z0)
        return self.head(z_out[-1]), z_out[-1], info


class NativeNet(nn.Module):
    def __init__(self, config: SolverConfig) -> None:
        super().__init__()
        self.inj = nn.Linear(D_IN, WIDTH)
        self.block = PcDEQLinear(WIDTH, activation="tanh", beta=5.0, config=config)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x: torch.Tensor):
        z = self.block(self.inj(x))
        return self.head(z), z


def _twins(core: str):
    pcdeq_plugin.register()
    args = pcdeq_deq_kwargs(
        pcdeq_defaults(), core=core, f_tol=1e-11, f_max_iter=500, b_tol=1e-12, b_max_iter=500
    )
    client = TorchDEQClient(args)
    # check_every=1: test convergence at every iteration, as TorchDEQ's solvers do (the
    # native default predicts the checks), so the two stopping iterations are comparable
    native = NativeNet(
        SolverConfig(tol=1e-11, max_iter=500, backward_tol=1e-11, on_failure="raise", check_every=1)
    )
    with torch.no_grad():
        w0 = torch.rand(WIDTH, WIDTH) * (2.0 / WIDTH)  # large enough to matter, still pcDEQ
        for module in (native, client):
            module.inj.load_state_dict(native.inj.state_dict())
            module.head.load_state_dict(native.head.state_dict())
        native.block.operator.weight = w0  # parametrization: g = ||w0||, v = w0
        client.layer.W.weight_v.copy_(w0)
        client.layer.W.weight_g.copy_(w0.norm(dim=1, keepdim=True))
    return client, native


def _grads(
    client: TorchDEQClient, native: NativeNet
) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    originals = native.block.operator.parametrizations.weight
    return [
        ("inj.weight", client.inj.weight.grad, native.inj.weight.grad),
        ("inj.bias", client.inj.bias.grad, native.inj.bias.grad),
        ("W.g", client.layer.W.weight_g.grad, originals.original0.grad),
        ("W.v", client.layer.W.weight_v.grad, originals.original1.grad),
        ("head.weight", client.head.weight.grad, native.head.weight.grad),
    ]


@pytest.mark.parametrize("core", ["sliced", "indexing"])
def test_client_matches_native_layer_over_training_steps(torchdeq_registries, float64, core):
    torch.manual_seed(0)
    client, native = _twins(core)
    x = torch.randn(BATCH, D_IN)
    y = torch.arange(BATCH) % CLASSES
    opt_client = torch.optim.SGD(client.parameters(), lr=0.5)
    opt_native = torch.optim.SGD(native.parameters(), lr=0.5)
    first_loss = None
    for step in range(4):
        logits_c, z_c, info = client(x)
        logits_n, z_n = native(x)
        # same fixed point
        assert torch.allclose(z_c, z_n, rtol=1e-8, atol=1e-10), f"step {step}"
        assert float(z_c.detach().min()) > 0  # pcDEQ-1 fixed point lies in the positive orthant
        # TorchDEQ's usual info, per sample
        for key in ("nstep", "abs_lowest", "rel_lowest"):
            assert info[key].shape == (BATCH,), key
        assert float(info["rel_lowest"].max()) < 1e-11
        native_iters = native.block.last_stats.forward.iterations
        assert abs(int(info["nstep"].max()) - native_iters) <= 2  # same method, same stop
        print(
            f"[{core}] step {step}: nstep={info['nstep'].tolist()} "
            f"abs_lowest={float(info['abs_lowest'].max()):.2e} "
            f"rel_lowest={float(info['rel_lowest'].max()):.2e} native_iters={native_iters}"
        )
        loss_c = F.cross_entropy(logits_c, y)
        loss_n = F.cross_entropy(logits_n, y)
        first_loss = float(loss_c.detach()) if first_loss is None else first_loss
        opt_client.zero_grad()
        opt_native.zero_grad()
        loss_c.backward()
        loss_n.backward()
        # same gradients, including through the implicit (adjoint) solve
        for name, g_client, g_native in _grads(client, native):
            assert g_client is not None and g_native is not None, name
            assert torch.allclose(g_client, g_native.view_as(g_client), rtol=1e-6, atol=1e-10), name
        opt_client.step()
        opt_native.step()
        native.block.after_optimizer_step()
    assert float(loss_c.detach()) < first_loss  # it trains
    reset_norm(client.layer)
    assert float(client.layer.W.weight.detach().min()) >= 0


def test_eval_mode_info_and_sradius(torchdeq_registries, float64) -> None:
    torch.manual_seed(1)
    client, native = _twins("sliced")
    client.eval()
    x = torch.randn(BATCH, D_IN)
    reset_norm(client.layer)
    u = F.softplus(client.inj(x), beta=5.0)
    z_out, info = client.deq(
        lambda z: client.layer(z, u), torch.zeros(BATCH, WIDTH), sradius_mode=True
    )
    _, z_native = native(x)
    assert torch.allclose(z_out[-1], z_native, rtol=1e-8, atol=1e-10)
    # the Jacobian at a pcDEQ fixed point has spectral radius < 1 (what makes b_solver converge)
    assert float(info["sradius"].max()) < 1.0


@pytest.mark.slow
def test_registration_in_spawned_processes(tmp_path) -> None:
    """Each spawned worker (as in DDP / DataLoader with 'spawn') registers again, safely."""
    script = tmp_path / "spawned.py"
    script.write_text(
        textwrap.dedent(
            """
            import multiprocessing as mp

            import pcdeq_plugin
            from torchdeq import get_deq
            import torch

            pcdeq_plugin.register()  # module level: runs in the parent and in every child


            def work(rank):
                assert pcdeq_plugin.register()["solver"] == "pcdeq"
                deq = get_deq(f_solver="pcdeq", b_solver="pcdeq", f_stop_mode="rel", f_tol=1e-6)
                a = torch.full((2, 3), 0.5 + rank)
                z, info = deq(lambda z: torch.tanh(0.5 * z + a), torch.zeros(2, 3))
                return rank, float(info["rel_lowest"].max())


            if __name__ == "__main__":
                with mp.get_context("spawn").Pool(2) as pool:
                    results = sorted(pool.map(work, [0, 1]))
                assert [r for r, _ in results] == [0, 1]
                assert all(res < 1e-6 for _, res in results), results
                print("ok", results)
            """
        )
    )
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")
