"""The map of one pcDEQ solve, ``g(z) = sigma(W z + u)``, with its structure made explicit.

:class:`PcDEQCellMap` is what a pcDEQ block hands to
:func:`~pcdeq_plugin.implicit.solve_implicit`: the map itself, its pcDEQ guarantee (so
the mixed-precision warm start is on by default where it pays), its low-precision
version, and the analytic adjoint

    J^T y = W^T (sigma'(a) * y),      a = W z* + u,

kept from the one differentiable step: a backward iteration is one transposed linear
map or convolution, with no autograd round trip and no second evaluation of the cell.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from .maps import FixedPointMap, LinearizedStep, MapFn

if TYPE_CHECKING:  # the block imports this module
    from .cells import PcDEQBlock

__all__ = ["MIN_WARM_START_MACS", "PcDEQCellMap", "activation_slope"]

#: Below this many multiply-adds per state element (a convolution's ``C k^2``, a dense
#: layer's width) the cell is memory-bound and bfloat16 barely speeds it up (measured
#: here, one thread, batch 64, 3x3 kernels: 12 channels 1.1x, 32 channels 1.5x, 82
#: channels 2x per iteration), so the warm start is not on by default there.
MIN_WARM_START_MACS = 256

#: derivatives written in terms of the activation's output (no second evaluation)
_SLOPE_FROM_OUTPUT: dict[Callable, Callable[[torch.Tensor], torch.Tensor]] = {
    torch.tanh: lambda out: 1.0 - out * out,
    torch.sigmoid: lambda out: out * (1.0 - out),
}


#: in-place versions of activations, for the solve's no-grad iterations
_IN_PLACE: dict[Callable, Callable[[torch.Tensor], torch.Tensor]] = {
    torch.tanh: torch.tanh_,
    torch.sigmoid: torch.sigmoid_,
}


def activation_slope(
    fn: Callable[[torch.Tensor], torch.Tensor], a: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """``sigma'(a)`` of an elementwise activation, given ``out = sigma(a)`` (no graph)."""
    from_output = _SLOPE_FROM_OUTPUT.get(fn)
    if from_output is not None:
        return from_output(out)
    with torch.enable_grad():
        leaf = a.detach().requires_grad_()
        value = fn(leaf)
        (slope,) = torch.autograd.grad(value, leaf, torch.ones_like(value))
    return slope


class PcDEQCellMap(FixedPointMap):
    """``z -> sigma(W z + u)`` for one solve of ``block`` with fixed ``u`` and ``W``.

    Args:
        block: The pcDEQ block (its activation and linear map).
        u: The injection, ``>= 0`` (pcDEQ-2) or ``> 0`` (pcDEQ-1).
        weight: The nonnegative recurrent weight, read once for the whole solve.
    """

    positive_concave = True

    def __init__(self, block: PcDEQBlock, u: torch.Tensor, weight: torch.Tensor) -> None:
        self.block = block
        self.fn = block.activation.fn
        self.fn_ = _IN_PLACE.get(self.fn)
        self.u = u
        self.weight = weight
        self.operand = block.operand(weight)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        a = self.block.pre_activation(z, self.u, self.operand)
        if self.fn_ is not None and not torch.is_grad_enabled():
            return self.fn_(a)  # the solve's iterations: no autograd, no new allocation
        return self.fn(a)

    def image_of_zero(self) -> torch.Tensor:
        """``sigma(u)``: ``sigma(W 0 + u)`` without the linear map (``W 0 = 0`` exactly)."""
        return self.fn(self.u)

    def low_precision_pays(self, state: torch.Tensor) -> bool:
        """Large states of compute-bound cells only (wide dense layers, many channels)."""
        return (
            super().low_precision_pays(state) and self.block.macs_per_element >= MIN_WARM_START_MACS
        )

    def in_precision(self, dtype: torch.dtype) -> MapFn:
        u = self.u.detach().to(dtype)
        operand = self.block.operand(self.weight.detach().to(dtype))
        return lambda z: self.fn(self.block.pre_activation(z, u, operand))

    def linearized_step(self, z_star: torch.Tensor) -> LinearizedStep:
        a = self.block.pre_activation(z_star.detach(), self.u, self.operand)
        out = self.fn(a)
        # the closures hold detached tensors only: the caller hooks `out`, and a hook that
        # kept `out` (or its graph) alive would be a cycle the garbage collector cannot see
        a_value, out_value, dtype = a.detach(), out.detach(), a.dtype
        weight = self.weight.detach()
        block, fn = self.block, self.fn
        slopes: dict[torch.dtype, torch.Tensor] = {}

        def slope(precision: torch.dtype) -> torch.Tensor:
            if not slopes:  # computed once, in the backward pass that needs it
                slopes[dtype] = activation_slope(fn, a_value, out_value)
            if precision not in slopes:
                slopes[precision] = slopes[dtype].to(precision)
            return slopes[precision]

        def adjoint(grad: torch.Tensor) -> MapFn:
            return block.adjoint_map(slope(dtype), weight, grad)

        def adjoint_in(precision: torch.dtype, grad: torch.Tensor) -> MapFn:
            return block.adjoint_map(slope(precision), weight.to(precision), grad.to(precision))

        return LinearizedStep(out, adjoint, adjoint_in)
