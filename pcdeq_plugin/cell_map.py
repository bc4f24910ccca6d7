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

from .autocast import autocast_off
from .maps import FixedPointMap, LinearizedStep, MapFn, Refinement, RefinementFn

if TYPE_CHECKING:  # the block imports this module
    from .cells import PcDEQBlock

__all__ = ["MIN_WARM_START_MACS", "PcDEQCellMap", "activation_slope", "correction_error_gain"]

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


#: Lipschitz constants (the largest slope) of the activations whose corrected images
#: carry an error bound: pcDEQ-1's tanh and pcDEQ-2's sigmoid
_LIPSCHITZ: dict[Callable, float] = {torch.tanh: 1.0, torch.sigmoid: 0.25}


def correction_error_gain(dtype: torch.dtype, macs: int, roundings: int) -> float | None:
    """Relative error bound of a low-precision linear map of an exactly known operand.

    A product ``W x`` computed from ``W`` and ``x`` each rounded to ``dtype`` (unit roundoff
    ``u``), with products accumulated in float32 over ``macs`` terms and the result rounded
    to ``dtype`` again, differs from the exact one by at most ``((1 + u)^r (1 + g) - 1)
    |W| |x|`` elementwise (``r = roundings`` such roundings, ``g = macs 2^-24 / (1 - macs
    2^-24)`` for the accumulation; bfloat16 products are exact in float32). Returns that
    factor, or ``None`` where the accumulation precision is not known to be float32: only
    bfloat16 on the CPU (oneDNN accumulates bfloat16 convolutions and matrix products in
    float32) is certified; CUDA's reduced-precision reductions are not.
    """
    if dtype != torch.bfloat16:
        return None
    unit = torch.finfo(dtype).eps / 2
    acc = macs * 2.0**-24
    if acc >= 0.5:
        return None
    return (1 + unit) ** roundings * (1 + acc / (1 - acc)) - 1


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
        block, fn, fn_ = self.block, self.fn, self.fn_
        if u.device.type == "cpu" and fn_ is not None:
            # The CPU's half-precision tanh kernel is slower than casting, activating in
            # float32 and rounding back (measured here: 12.3 ms against 4.9 ms on a 64 x 82
            # x 28 x 28 bfloat16 state), with the same correctly rounded result.
            return lambda z: fn_(block.pre_activation(z, u, operand).float()).to(dtype)
        return lambda z: fn(block.pre_activation(z, u, operand))

    def refinement(
        self, base: torch.Tensor, dtype: torch.dtype, rows: torch.Tensor | None = None
    ) -> Refinement:
        """``f(base)`` in float32, and ``z -> sigma(a + W_low (z - base))`` with ``a = W base + u``.

        ``a`` is kept from that one float32 evaluation, so the low-precision product only
        carries ``z - base``: after the warm phase a fraction of the state of the order of
        its residual (1e-3 .. 1e-2), whose rounding error (bfloat16: 2^-9 relative) is that
        fraction of a whole bfloat16 evaluation's. The corrected map's floor therefore
        lies far below a typical ``tol`` (about 1e-5 against the warm phase's 2.6e-3 on
        the single-conv net), at the cost of a bfloat16 linear map, a cast and three
        passes, with no state-sized allocation but the linear map's output.

        Error bound (tanh and sigmoid, bfloat16 on the CPU): the corrected image differs
        from ``f(z)`` by at most ``L c S ||z - base||`` per sample, with ``L`` the
        activation's Lipschitz constant, ``c`` :func:`correction_error_gain` (three
        roundings: ``z - base``, ``W``, the product) and ``S``
        :meth:`~pcdeq_plugin.cells.PcDEQBlock.operator_norm_bound`, beyond the rounding
        of ``a`` and of the activation in float32, which a float32 evaluation of ``f``
        has too.
        """
        block, fn, fn_ = self.block, self.fn, self.fn_
        u = self.u
        if rows is not None:
            base, u = base.index_select(0, rows), u.index_select(0, rows)
        a_base = block.pre_activation(base, u, self.operand)
        image = fn(a_base)  # out of place: a_base is kept for the corrections
        low_weight = self.weight.detach().to(dtype)
        low = torch.empty_like(base, dtype=dtype)

        def corrected(z: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
            low.copy_(torch.sub(z, base, out=out))  # out is scratch until the last line
            out.copy_(block.linear_map(low, low_weight)).add_(a_base)
            return fn_(out) if fn_ is not None else out.copy_(fn(out))

        # three roundings: z - base, W, their product
        bound = _error_bound(block, self.weight, base, dtype, _LIPSCHITZ.get(fn), roundings=3)
        return Refinement(image, corrected, bound)

    def linearized_step(self, z_star: torch.Tensor) -> LinearizedStep:
        """The differentiable step and its analytic adjoint.

        For tanh and sigmoid (pcDEQ-1 and pcDEQ-2 as in the paper) there is no evaluation:
        ``z*`` is the image ``sigma(a)`` of the solve's last iteration, whose slope
        ``sigma'(a)`` is a function of ``z*`` alone, so ``z*`` itself is the output and
        :class:`_LinearizedFixedPoint` gives ``u`` and ``W`` their gradients through that
        linearisation (within the solve's tolerance of the linearisation at ``z*``, as the
        implicit gradient itself). Other activations need ``a``: one evaluation at ``z*``.
        """
        from_output = _SLOPE_FROM_OUTPUT.get(self.fn)
        z_star = z_star.detach()
        # the closures hold detached tensors only: the caller hooks the output, and a hook
        # that kept it (or its graph) alive would be a cycle the garbage collector cannot see
        weight = self.weight.detach()
        block, fn, dtype = self.block, self.fn, z_star.dtype
        max_slope = _LIPSCHITZ.get(fn)
        slopes: dict[torch.dtype, torch.Tensor] = {}
        if from_output is not None:

            def first_slope() -> torch.Tensor:
                return from_output(z_star)

            out = _LinearizedFixedPoint.apply(z_star, self.u, self.weight, block, weight, slopes)
        else:
            a = self.block.pre_activation(z_star, self.u, self.operand)
            out = self.fn(a)
            a_value, out_value = a.detach(), out.detach()

            def first_slope() -> torch.Tensor:
                return activation_slope(fn, a_value, out_value)

        def slope(precision: torch.dtype) -> torch.Tensor:
            if dtype not in slopes:  # computed once, in the backward pass that needs it
                slopes[dtype] = first_slope()
            if precision not in slopes:
                slopes[precision] = slopes[dtype].to(precision)
            return slopes[precision]

        def adjoint(grad: torch.Tensor) -> MapFn:
            return block.adjoint_map(slope(dtype), weight, grad)

        def adjoint_in(precision: torch.dtype, grad: torch.Tensor) -> MapFn:
            return block.adjoint_map(slope(precision), weight.to(precision), grad.to(precision))

        def adjoint_refinement(grad: torch.Tensor) -> RefinementFn:
            """``y -> b + W_low^T (sigma'(a) * (y - base))_low`` with ``b = W^T (sigma'(a) *
            base) + grad`` from one float32 iteration: the adjoint map is affine, so only
            the low-precision product of the small change is rounded."""

            def refinement(
                base: torch.Tensor, precision: torch.dtype, rows: torch.Tensor | None
            ) -> Refinement:
                full, low_slope, g = slope(dtype), slope(precision), grad
                if rows is not None:
                    base, g = base.index_select(0, rows), g.index_select(0, rows)
                    full, low_slope = full.index_select(0, rows), low_slope.index_select(0, rows)
                offset = block.adjoint_map(full, weight, g)(base)
                low_weight = weight.to(precision)
                low = torch.empty_like(base, dtype=precision)

                def corrected(y: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
                    low.copy_(torch.sub(y, base, out=out)).mul_(low_slope)
                    return out.copy_(block.transposed_map(low, low_weight)).add_(offset)

                    # five roundings (y - base, the slope, their product, W, the product); the

                # slope is at most the activation's Lipschitz constant; the map is affine
                bound = _error_bound(block, weight, base, precision, max_slope, roundings=5)
                # the iterate is a copy: the caller reuses iterates' memory as buffers
                return Refinement(offset.clone(), corrected, bound)

            return refinement

        return LinearizedStep(out, adjoint, adjoint_in, adjoint_refinement)


def _error_bound(
    block: PcDEQBlock,
    weight: torch.Tensor,
    base: torch.Tensor,
    dtype: torch.dtype,
    slope_bound: float | None,
    *,
    roundings: int,
) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None:
    """A corrected map's error bound ``(z, work) -> L c S ||z - base||`` per sample, or
    ``None`` where it cannot be certified (an activation without a known slope bound
    ``L``, a precision or device whose accumulation is not known to be float32).

    ``c`` is :func:`correction_error_gain` for ``roundings`` roundings and ``S`` the
    block's :meth:`~pcdeq_plugin.cells.PcDEQBlock.operator_norm_bound`; ``z - base``
    goes into ``work`` where given (no state-sized allocation).
    """
    gain = correction_error_gain(dtype, block.macs_per_element, roundings)
    if gain is None or slope_bound is None or base.device.type != "cpu":
        return None
    scale = slope_bound * gain * block.operator_norm_bound(weight)
    dims = tuple(range(1, base.dim()))

    def bound(z: torch.Tensor, work: torch.Tensor | None = None) -> torch.Tensor:
        delta = z - base if work is None else torch.sub(z, base, out=work)
        return torch.linalg.vector_norm(delta, dim=dims).float().mul_(scale)

    return bound


class _LinearizedFixedPoint(torch.autograd.Function):
    """``z* = sigma(W z + u)`` at the solve's last iteration, differentiated in ``u`` and ``W``.

    The forward pass returns ``z*`` unchanged (no evaluation of the cell). The backward
    pass receives the adjoint ``y`` (the backward hook has solved for it) and returns
    ``dL/du = sigma'(a) * y`` and ``dL/dW``, the weight gradient of the linear map at
    ``z*`` for the output gradient ``sigma'(a) * y`` (one matrix product or one
    convolution weight gradient). ``slopes`` is the dictionary the adjoint maps fill
    with ``sigma'(a)`` (computed once per backward pass).
    """

    @staticmethod
    def forward(ctx, z_star, u, weight, block, weight_value, slopes):  # type: ignore[override]
        ctx.block, ctx.weight_value, ctx.slopes = block, weight_value, slopes
        ctx.save_for_backward(z_star)
        return z_star

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (z_star,) = ctx.saved_tensors
        # float32 as the forward solve, even if backward() runs inside an autocast region
        with autocast_off(z_star.device.type):
            slope = ctx.slopes.get(z_star.dtype)
            if slope is None:  # a backward that did not go through the hook (no adjoint)
                slope = _SLOPE_FROM_OUTPUT[ctx.block.activation.fn](z_star)
            scaled = slope * grad.to(z_star.dtype)
            grad_u = scaled if ctx.needs_input_grad[1] else None
            grad_w = None
            if ctx.needs_input_grad[2]:
                grad_w = ctx.block.weight_gradient(z_star, scaled, ctx.weight_value)
        return None, grad_u, grad_w, None, None, None
