"""The pcDEQ networks under bfloat16 autocast: the blocks solve in float32, the rest casts."""

from __future__ import annotations

import pytest
import torch

from pcdeq_plugin import build_model

NETS = [f"pcdeq-{arch}-{v}" for arch in ("linear", "single-conv", "multi-conv") for v in (1, 2)]


@pytest.mark.parametrize("name", NETS)
def test_bf16_autocast_trains_and_solves_in_float32(name):
    torch.manual_seed(0)
    model = build_model(name, (1, 28, 28), 10, preset="small")
    x = torch.rand(4, 1, 28, 28)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
    logits.float().sum().backward()
    stats = model.solver_stats()
    assert all(s.forward.all_converged and s.backward.all_converged for s in stats)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    # the same batch without autocast gives the same predictions
    with torch.no_grad():
        reference = model(x)
    assert torch.equal(logits.float().argmax(1), reference.argmax(1))
