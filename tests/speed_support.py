"""Helpers for the speed-option tests: float64 pcDEQ blocks and a log of their evaluations.

:func:`instrument` wraps a block's ``pre_activation`` (one evaluation of the cell's
linear part, ``W z + u``: every evaluation of the map goes through it, low-precision
warm phases included) and ``adjoint_map`` (each call of the map it returns is one
iteration of the analytic adjoint), recording each call's dtype, grad mode and layout.
The counts then say exactly how often a training step or an evaluation runs the map.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import pcdeq_plugin as P
from pcdeq_plugin.activations import VARIANT_KINDS
from pcdeq_plugin.cells import PcDEQBlock, PcDEQConv, PcDEQLinear

#: activation kind -> the pcDEQ variant that takes it
VARIANT_OF_KIND = {kind: variant for variant, kind in VARIANT_KINDS.items()}


@dataclass(frozen=True)
class Call:
    """One recorded call: the state's dtype, the grad mode, whether it is channels-last,
    and its batch size (the refinement's probe evaluates a few samples)."""

    dtype: torch.dtype
    grad_enabled: bool
    channels_last: bool
    batch: int = 0


@dataclass
class CallLog:
    """Calls of a block's map (``cell``), of its analytic adjoint map (``adjoint``), and of
    its linear map outside the map (``correction``: the refinement's corrected map)."""

    cell: list[Call] = field(default_factory=list)
    adjoint: list[Call] = field(default_factory=list)
    correction: list[Call] = field(default_factory=list)

    def clear(self) -> None:
        self.cell.clear()
        self.adjoint.clear()
        self.correction.clear()

    def count(self, which: str, dtype: torch.dtype | None = None, batch: int | None = None) -> int:
        calls = getattr(self, which)
        return sum(
            1
            for c in calls
            if (dtype is None or c.dtype == dtype) and (batch is None or c.batch == batch)
        )


def _record(calls: list[Call], z: torch.Tensor) -> None:
    channels_last = z.dim() == 4 and z.is_contiguous(memory_format=torch.channels_last)
    calls.append(Call(z.dtype, torch.is_grad_enabled(), channels_last, z.shape[0]))


def instrument(block: PcDEQBlock) -> CallLog:
    """Record every evaluation of ``block``'s map and of its analytic adjoint (in place)."""
    log = CallLog()
    pre_activation, adjoint_map = block.pre_activation, block.adjoint_map
    linear_map = block.linear_map
    inside = [False]  # a linear map inside pre_activation is part of that evaluation

    def counted_pre_activation(z, u, operand):
        _record(log.cell, z)
        inside[0] = True
        try:
            return pre_activation(z, u, operand)
        finally:
            inside[0] = False

    def counted_linear_map(z, weight=None):
        if not inside[0]:
            _record(log.correction, z)
        return linear_map(z, weight)

    def counted_adjoint_map(slope, weight, grad):
        inner = adjoint_map(slope, weight, grad)

        def counted(y):
            _record(log.adjoint, y)
            return inner(y)

        return counted

    # instance attributes shadow the methods the cell map looks up on the block
    block.pre_activation = counted_pre_activation
    block.adjoint_map = counted_adjoint_map
    block.linear_map = counted_linear_map
    return log


def float64_block(
    kind: str, activation: str, *, n: int = 3, scale: float = 0.6, **config: object
) -> PcDEQBlock:
    """A float64 block with a random ``W >= 0`` of largest row sum ``scale`` (a contraction
    for every catalogue activation whose slope is at most 1), variant from the activation."""
    cls = PcDEQLinear if kind == "linear" else PcDEQConv
    variant = VARIANT_OF_KIND[P.get_activation(activation).kind]
    settings = {"tol": 1e-12, "max_iter": 3000, "on_failure": "raise", **config}
    block = cls(
        n,
        variant=variant,
        activation=activation,
        constraint="clamp",
        config=P.SolverConfig(**settings),
    ).double()
    with torch.no_grad():
        w = block.operator.parametrizations.weight.original
        w.copy_(torch.rand_like(w))
        w.mul_(scale / w.flatten(1).sum(dim=1).max())
    return block


def pre_injection(kind: str, n: int = 3, batch: int = 2, dtype=torch.float64) -> torch.Tensor:
    """A pre-injection shaped for a block of ``kind``, shifted so that ``u`` is not tiny."""
    shape = (batch, n) if kind == "linear" else (batch, n, 4, 4)
    return torch.randn(shape, dtype=dtype) + 0.5


def unrolled_block(block: PcDEQBlock, pre: torch.Tensor, steps: int = 300) -> torch.Tensor:
    """Reference: autograd straight through ``steps`` plain iterations of the block's cell."""
    u = block.injection(pre)
    w = block.weight
    z = torch.zeros_like(u)
    for _ in range(steps):
        z = block.cell(z, u, w)
    return z


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||``."""
    return float((a - b).norm() / b.norm())
