"""LayoutBatchNorm2d: nn.BatchNorm2d, with small-channel CPU batch statistics in NCHW."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pcdeq_plugin import build_model
from pcdeq_plugin.norms import NCHW_BELOW_CHANNELS, LayoutBatchNorm2d

CL = torch.channels_last


@contextlib.contextmanager
def threads(n: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _pair(channels: int, **kwargs) -> tuple[nn.BatchNorm2d, LayoutBatchNorm2d]:
    torch.manual_seed(0)
    native = nn.BatchNorm2d(channels, **kwargs)
    ours = LayoutBatchNorm2d(channels, **kwargs)
    with torch.no_grad():
        native.weight.uniform_(0.5, 2.0)
        native.bias.uniform_(-1.0, 1.0)
    ours.load_state_dict(native.state_dict())
    return native, ours


def test_switch_is_taken_exactly_where_uses_nchw():
    norm = LayoutBatchNorm2d(12).train()
    x = torch.rand(4, 12, 6, 6).contiguous(memory_format=CL)
    with threads(2):
        assert norm._uses_nchw(x)
        assert not norm._uses_nchw(x.contiguous())  # already NCHW
        assert (
            not LayoutBatchNorm2d(NCHW_BELOW_CHANNELS)
            .train()
            ._uses_nchw(torch.rand(4, NCHW_BELOW_CHANNELS, 6, 6).contiguous(memory_format=CL))
        )
        assert not LayoutBatchNorm2d(12, auto_layout=False).train()._uses_nchw(x)
        assert not norm.eval()._uses_nchw(x)  # running statistics: native, cheap
        no_stats = LayoutBatchNorm2d(12, track_running_stats=False).eval()
        assert no_stats._uses_nchw(x)  # batch statistics in evaluation too
    with threads(1):
        assert not norm.train()._uses_nchw(x)


@pytest.mark.parametrize("channels", [3, 12])
def test_nchw_path_matches_batchnorm_values_gradients_and_statistics(channels):
    native, ours = _pair(channels)
    x = (torch.randn(8, channels, 7, 5) * 3 + 2).contiguous(memory_format=CL)
    grad = torch.randn(8, channels, 7, 5).contiguous(memory_format=CL)
    with threads(2):
        assert ours._uses_nchw(x)
        outputs = []
        for norm in (native, ours):
            leaf = x.clone().requires_grad_()
            out = norm(leaf)
            out.backward(grad)
            outputs.append((out, leaf.grad, norm.weight.grad, norm.bias.grad))
    assert outputs[1][0].is_contiguous(memory_format=CL)  # the layout is handed back
    for a, b in zip(*outputs):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.running_mean, native.running_mean)
    torch.testing.assert_close(ours.running_var, native.running_var)
    assert int(ours.num_batches_tracked) == int(native.num_batches_tracked) == 1
    ours.eval(), native.eval()
    torch.testing.assert_close(ours(x), native(x))


def test_backbones_switch_only_under_the_auto_layout():
    auto = build_model("multi-conv", (1, 28, 28), 10, widths=(3, 4, 5))
    forced = build_model(
        "multi-conv", (1, 28, 28), 10, widths=(3, 4, 5), memory_format="channels_last"
    )
    norms = [m for m in auto.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(isinstance(m, LayoutBatchNorm2d) and m.auto_layout for m in norms)
    assert all(not m.auto_layout for m in forced.modules() if isinstance(m, LayoutBatchNorm2d))
    assert "auto_layout=False" in repr(forced.bn1)
    # the same parameters and buffers as before, so checkpoints keep loading
    assert set(auto.state_dict()) == set(forced.state_dict())
    assert "bn1.running_mean" in auto.state_dict()


def test_training_step_is_the_forced_layouts_within_rounding():
    torch.manual_seed(0)
    auto = build_model("pcdeq-multi-conv-1", (1, 28, 28), 10, widths=(3, 4, 5))
    forced = build_model(
        "pcdeq-multi-conv-1", (1, 28, 28), 10, widths=(3, 4, 5), memory_format="channels_last"
    )
    forced.load_state_dict(auto.state_dict())
    x, y = torch.rand(6, 1, 28, 28), torch.arange(6) % 10
    grads = []
    with threads(2):
        for model in (auto, forced):
            model.train()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(grads[0][1], grads[1][1]):
        # the solves stop within tol of slightly different fixed points: O(tol) apart
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_auto_layout_must_be_a_bool():
    with pytest.raises(ValueError, match="auto_layout must be True or False"):
        LayoutBatchNorm2d(12, auto_layout="no")
