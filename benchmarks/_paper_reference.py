"""A reference implementation of the official pcDEQ algorithm, for ``bench_speed.py``.

It reproduces what ``mateuszgabor/pcdeq`` does for one DEQ block (pcdeq.md sections
2.5-2.6, the "Deep Implicit Layers" tutorial recipe), written here from that description:

1. Picard iteration ``z <- g(z)`` from ``z = 0`` under ``torch.no_grad()``, stopped when the
   **batch-wide** relative residual ``||g(z) - z||_F / (||g(z)||_F + 1e-5)`` is below ``tol``
   (norms over the whole batch tensor, one host read per step), cap ``max_iter``, no
   convergence signal;
2. one differentiable step ``z = g(z*)``;
3. a **second** evaluation ``f0 = g(z0)`` on a detached leaf copy ``z0`` of ``z``, built in
   the forward pass and kept for the backward pass;
4. a tensor hook on ``z`` that solves ``y = J^T y + dL/dz`` from ``y = dL/dz`` with the same
   iteration and stopping rule, each ``J^T y`` an ``autograd.grad(f0, z0, y,
   retain_graph=True)``.

The map is ``g(z) = sigma(W z + u)`` in NCHW float32, read from one of our pcDEQ blocks
(:class:`pcdeq_plugin.PcDEQLinear` or :class:`pcdeq_plugin.PcDEQConv`): its activation, its
nonnegative weight ``W`` and its injection settings, so the reference runs on the very same
parameters. :func:`paper_reference_model` swaps this solve into a model's blocks.

Two places where the reference is *kinder* than the official code, so that speed-ups
measured against it are not inflated:

* ``W`` is computed from its parametrization once per forward pass; the official code's
  legacy ``weight_norm`` hook recomputes it at every iteration (pcdeq.md section 2.3).
* Under ``torch.no_grad()`` steps 3-4 are skipped (no graph can be built there; the official
  evaluation loop never uses ``no_grad`` and pays for the graph anyway).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pcdeq_plugin import ImplicitModel, PcDEQBlock, PcDEQConv, PcDEQLinear
from pcdeq_plugin.pooling import SameMaxPool2d

__all__ = [
    "PAPER_EPS",
    "PaperSolveRecord",
    "paper_fixed_point",
    "paper_injection",
    "paper_map",
    "paper_reference_model",
    "paper_records",
]

#: the official solver's denominator guard (ours uses 1e-8 per sample)
PAPER_EPS = 1e-5

MapFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class PaperSolveRecord:
    """What the reference records for one block: iterations of its latest solves."""

    forward_iterations: int = 0
    backward_iterations: int | None = None
    forward_residuals: list[float] = field(default_factory=list)


def paper_fixed_point(
    fn: MapFn, z0: torch.Tensor, *, tol: float, max_iter: int
) -> tuple[torch.Tensor, int, list[float]]:
    """Picard iteration with the official batch-wide stopping rule.

    Returns:
        ``(g(z_k), k, residuals)``: the last image, the number of evaluations of ``fn`` and
        the batch-wide residual after each.
    """
    z = z0
    residuals: list[float] = []
    while len(residuals) < max_iter:
        fz = fn(z)
        # two host reads per step, as in the official solver
        residuals.append((fz - z).norm().item() / (fz.norm().item() + PAPER_EPS))
        z = fz
        if residuals[-1] < tol:
            break
    return z, len(residuals), residuals


def paper_map(block: PcDEQBlock, u: torch.Tensor, weight: torch.Tensor) -> MapFn:
    """``z -> sigma(W z + u)`` for one of our pcDEQ blocks, written out (NCHW float32)."""
    if isinstance(block, PcDEQConv):
        padding = block.kernel_size // 2

        def linear(z: torch.Tensor) -> torch.Tensor:
            return F.conv2d(z, weight, padding=padding)
    elif isinstance(block, PcDEQLinear):

        def linear(z: torch.Tensor) -> torch.Tensor:
            return F.linear(z, weight)
    else:
        raise TypeError(
            f"the paper reference knows PcDEQLinear and PcDEQConv blocks, got "
            f"{type(block).__name__}"
        )
    activation = block.activation.fn
    return lambda z: activation(linear(z) + u)


def paper_injection(block: PcDEQBlock, pre_injection: torch.Tensor) -> torch.Tensor:
    """The official injections: softplus (beta) for pcDEQ-1, ReLU for pcDEQ-2."""
    u = F.softplus(pre_injection, beta=block.beta) if block.variant == 1 else F.relu(pre_injection)
    return u + block.injection_floor if block.injection_floor else u


def _paper_forward(
    block: PcDEQBlock, pre_injection: torch.Tensor, tol: float, max_iter: int
) -> torch.Tensor:
    record: PaperSolveRecord = block.paper_record
    pre_injection = pre_injection.contiguous()  # NCHW, as the official code
    u = paper_injection(block, pre_injection)
    weight = block.weight  # once per forward, in the caller's grad mode
    g = paper_map(block, u, weight)
    with torch.no_grad():
        z_star, iterations, residuals = paper_fixed_point(
            g, torch.zeros_like(u), tol=tol, max_iter=max_iter
        )
    record.forward_iterations, record.forward_residuals = iterations, residuals
    record.backward_iterations = None
    z = g(z_star)  # the one differentiable step
    if not z.requires_grad:
        return z
    z0 = z.clone().detach().requires_grad_()
    f0 = g(z0)  # the second evaluation: the graph the hook's VJPs run through

    def backward_hook(grad: torch.Tensor) -> torch.Tensor:
        def adjoint(y: torch.Tensor) -> torch.Tensor:
            return torch.autograd.grad(f0, z0, y, retain_graph=True)[0] + grad

        y, record.backward_iterations, _ = paper_fixed_point(
            adjoint, grad, tol=tol, max_iter=max_iter
        )
        return y

    z.register_hook(backward_hook)
    return z


def paper_reference_model(
    model: ImplicitModel, *, tol: float = 1e-4, max_iter: int = 200
) -> ImplicitModel:
    """Make ``model`` solve its pcDEQ blocks with the paper's algorithm, in place.

    Everything outside the blocks (stems, BatchNorm, classifier) and every parameter stay
    as they are, except that our max pools' fast evaluation path
    (:class:`pcdeq_plugin.pooling.SameMaxPool2d`) becomes the paper's ``nn.MaxPool2d``;
    build ``model`` NCHW float32 (our plain options) for a faithful reference. Each
    block's :class:`PaperSolveRecord` is in ``block.paper_record``.

    Args:
        model: One of our pcDEQ networks (every implicit block a linear or conv pcDEQ block).
        tol: The official solver's tolerance (forward and backward), default 1e-4.
        max_iter: The official cap (forward and backward), default 200.

    Returns:
        ``model`` itself.

    Raises:
        TypeError: the model has a block that is not a linear or conv pcDEQ block.
        ValueError: the model has no implicit block.
    """
    blocks = model.implicit_blocks()
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no implicit block to solve")
    for block in blocks:
        if not isinstance(block, (PcDEQLinear, PcDEQConv)):
            raise TypeError(
                f"the paper reference knows PcDEQLinear and PcDEQConv blocks, got "
                f"{type(block).__name__} ({block.block_name})"
            )
        block.paper_record = PaperSolveRecord()

        def forward(pre_injection: torch.Tensor, _block: nn.Module = block) -> torch.Tensor:
            return _paper_forward(_block, pre_injection, tol, max_iter)

        # an instance attribute shadows the class's forward; hooks still run via __call__
        block.forward = forward
    for parent in model.modules():  # the paper's pool: the native operator, in every mode
        for name, child in list(parent.named_children()):
            if isinstance(child, SameMaxPool2d):
                setattr(parent, name, nn.MaxPool2d(3, stride=1, padding=1))
    return model


def paper_records(model: ImplicitModel) -> list[PaperSolveRecord]:
    """The reference's per-block records of a model made by :func:`paper_reference_model`."""
    return [block.paper_record for block in model.implicit_blocks()]
