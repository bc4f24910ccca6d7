"""pcDEQ on CUDA gives the CPU's answers (skipped without a GPU; ``benchmarks/gpu_check.sh``).

The CUDA models run with the library's defaults (on CUDA: whatever layout, warm start and
adjoint the defaults pick), the CPU reference with every speed option the library has
forced off. TF32 is switched off here so that the comparison measures the solver, not
TF32's 10-bit mantissa.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from pcdeq_plugin import SolverConfig, build_model

pytestmark = pytest.mark.cuda

SHAPE = (1, 28, 28)
TOL = 1e-6
#: every speed option forced off (only those this library has)
PLAIN = {
    key: value
    for key, value in {
        "warm_start": "off",
        "adjoint": "autograd",
        "reuse_step_graph": False,
    }.items()
    if key in SolverConfig.field_names()
}


@pytest.fixture(autouse=True)
def _no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _plain_options(name: str) -> dict[str, Any]:
    options = dict(PLAIN)
    if "conv" in name:
        try:
            build_model(name, SHAPE, 10, preset="small", memory_format="contiguous")
        except TypeError as exc:  # this library has no layout option
            if "memory_format" not in str(exc):
                raise
        else:
            options["memory_format"] = "contiguous"
    return options


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def forward_backward_gap(name: str, device: torch.device) -> tuple[float, float, float]:
    """Relative gaps (train logits, parameter gradients, eval logits) between ``device``
    with the defaults and the CPU with the plain path, on the same weights and batch."""
    reference = build_model(name, SHAPE, 10, preset="small", tol=TOL, **_plain_options(name))
    model = build_model(name, SHAPE, 10, preset="small", tol=TOL)
    model.load_state_dict(reference.state_dict())
    model.to(device)
    x = torch.rand(16, *SHAPE)
    y = torch.randint(0, 10, (16,))
    outputs, grads = [], []
    for net, dev in ((reference, torch.device("cpu")), (model, device)):
        net.train()
        logits = net(x.to(dev))
        F.cross_entropy(logits, y.to(dev)).backward()
        outputs.append(logits)
        grads.append(torch.cat([p.grad.flatten().cpu() for p in net.parameters()]))
    with torch.no_grad():
        eval_logits = [net.eval()(x.to(dev)) for net, dev in ((reference, "cpu"), (model, device))]
    return (
        _relative(outputs[1], outputs[0]),
        _relative(grads[1], grads[0]),
        _relative(eval_logits[1], eval_logits[0]),
    )


@pytest.mark.parametrize("name", ["pcdeq-linear-1", "pcdeq-single-conv-2", "pcdeq-multi-conv-1"])
def test_forward_and_backward_on_cuda_match_the_cpu(name):
    train_gap, grad_gap, eval_gap = forward_backward_gap(name, torch.device("cuda"))
    assert train_gap < 1e-4 and eval_gap < 1e-4
    assert grad_gap < 1e-3


def warm_start_solve(warm_start: str, device: torch.device) -> tuple[list, torch.Tensor]:
    """Per-block forward statistics and logits of an eval forward with ``warm_start``."""
    model = build_model(
        "pcdeq-single-conv-1",
        SHAPE,
        10,
        preset="small",
        tol=TOL,
        on_failure="raise",
        warm_start=warm_start,
        init_scale=0.05,  # a recurrent weight well off zero: a real number of iterations
    ).to(device)
    model.eval()
    with torch.no_grad():
        logits = model(torch.rand(32, *SHAPE, device=device))
    return [s.forward for s in model.solver_stats()], logits


@pytest.mark.parametrize("warm_start", ["bf16", "fp16"])
def test_low_precision_warm_start_on_cuda_converges_per_sample(warm_start):
    if "warm_start" not in SolverConfig.field_names():
        pytest.skip("this pcdeq_plugin has no SolverConfig.warm_start")
    device = torch.device("cuda")
    torch.manual_seed(0)
    stats, logits = warm_start_solve(warm_start, device)
    torch.manual_seed(0)
    plain_stats, plain_logits = warm_start_solve("off", device)
    for s in stats:
        assert bool(s.converged.all()) and s.max_residual < TOL
        assert s.residual.dtype == torch.float32 and s.residual.shape == (32,)
    assert plain_stats[0].iterations >= 5  # the problem is not trivial
    assert _relative(logits, plain_logits) < 1e-4
