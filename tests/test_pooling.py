"""The backbones' max pool: the separable evaluation path gives the native operator's values
exactly, and training keeps the native operator (its indices route the gradient)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pcdeq_plugin as P
from pcdeq_plugin.pooling import SameMaxPool2d, separable_max_pool_3x3

SHAPES = [(4, 12, 28, 28), (3, 5, 13, 13), (2, 3, 6, 6), (2, 4, 1, 7), (2, 3, 7, 1), (1, 1, 1, 1)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_separable_pool_equals_the_native_operator(shape, layout, dtype) -> None:
    torch.manual_seed(0)
    x = torch.randn(*shape).to(dtype).contiguous(memory_format=layout)
    x[..., : shape[2] // 2, :] = 0.25  # a constant region: ties everywhere
    x[0, 0, 0, 0] = float("inf")
    x[-1, -1, -1, -1] = -float("inf")
    got = separable_max_pool_3x3(x)
    assert torch.equal(got, F.max_pool2d(x, 3, 1, 1))
    assert got.dtype == x.dtype and got.is_contiguous(memory_format=layout)


def test_nan_propagates_like_the_native_operator() -> None:
    x = torch.rand(1, 2, 5, 5)
    x[0, 1, 2, 2] = float("nan")
    got, want = separable_max_pool_3x3(x), F.max_pool2d(x, 3, 1, 1)
    assert torch.equal(got.isnan(), want.isnan()) and int(got.isnan().sum()) == 9
    assert torch.equal(got.nan_to_num(), want.nan_to_num())


def test_the_module_uses_the_native_operator_where_a_gradient_is_needed(monkeypatch) -> None:
    calls = []
    native = F.max_pool2d

    def counting(*args, **kwargs):
        calls.append(1)
        return native(*args, **kwargs)

    monkeypatch.setattr(F, "max_pool2d", counting)
    pool = SameMaxPool2d()
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    pool(x).sum().backward()  # training: native, with indices
    assert len(calls) == 1
    (ref,) = torch.autograd.grad(native(x, 3, 1, 1).sum(), x)
    assert torch.equal(x.grad, ref)
    with torch.no_grad():
        pool(x)
    pool(x.detach())
    assert len(calls) == 1  # evaluation: the separable path
    assert isinstance(pool, torch.nn.MaxPool2d) and pool.kernel_size == 3


@pytest.mark.parametrize("name", ["pcdeq-single-conv-1", "pcdeq-multi-conv-2"])
def test_conv_networks_evaluate_with_the_separable_pool(name: str) -> None:
    model = P.build_model(name, (1, 28, 28), 10, preset="small", init_scale=2e-3).eval()
    pools = [m for m in model.modules() if isinstance(m, torch.nn.MaxPool2d)]
    assert pools and all(isinstance(m, SameMaxPool2d) for m in pools)
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        fast = model(x)
        for pool in pools:  # the native operator in every pool
            pool.forward = lambda t, _p=pool: torch.nn.MaxPool2d.forward(_p, t)
        native = model(x)
    assert torch.equal(fast, native)
