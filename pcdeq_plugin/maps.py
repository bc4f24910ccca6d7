"""Fixed-point maps that tell :func:`~pcdeq_plugin.implicit.solve_implicit` more than their values.

A plain callable ``f(z)`` is enough for :func:`solve_implicit`. A map that subclasses
:class:`FixedPointMap` can also offer:

* :attr:`FixedPointMap.positive_concave` -- the pcDEQ guarantee (a unique fixed point
  that plain iteration reaches from *any* nonnegative start). Only such maps get the
  mixed-precision warm start by default (:mod:`pcdeq_plugin.warm_start`).
* :meth:`FixedPointMap.in_precision` -- the same map evaluated in a low precision, for
  that warm start.
* :meth:`FixedPointMap.linearized_step` -- the one differentiable step together with an
  analytic Jacobian-transpose product (pcDEQ cells: ``J^T y = W^T (sigma'(a) * y)``), so
  the backward solve needs no autograd round trip and no second evaluation.
* :meth:`FixedPointMap.image_of_zero` -- ``f(0)`` without an evaluation (pcDEQ cells:
  ``sigma(u)``), so a solve from zero saves its first linear map.
* :meth:`FixedPointMap.refinement` -- after the warm phase, one full-precision
  evaluation and a cheap corrected map around it (pcDEQ cells: the low-precision product
  carries only ``z - base``), so the iterations between the warm phase and the last
  float32 check cost low-precision ones; with a rigorous bound on the corrected map's
  error, the last check itself can be a corrected one (:class:`Refinement`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "AdjointMapFactory",
    "FixedPointMap",
    "LinearizedStep",
    "MIN_WARM_START_ELEMENTS",
    "MapFn",
    "RefinedMap",
    "Refinement",
    "RefinementFn",
]

MapFn = Callable[[torch.Tensor], torch.Tensor]
#: Below this many state elements a map is dominated by per-operation overhead, not by
#: arithmetic, and a low-precision warm start costs more than it saves: its casts, the
#: refinement's probe and bound add some 350 operations per solve (measured here on the
#: multi-conv nets' third block, 64 x 48 x 6 x 6 = 110,592 elements: its evaluation was
#: 0.2-2.3 ms slower with the warm start than without, one and two threads, in five of
#: six interleaved comparisons; the linear nets' 64 x 80 states lose more).
MIN_WARM_START_ELEMENTS = 1 << 18

#: ``(z, out) -> f~(z)``: a refinement's corrected map, written into ``out`` (a buffer
#: shaped like ``z`` that does not overlap it) and returned. The caller reuses earlier
#: iterates' memory as ``out``, the first iterate's included, so the map must not keep
#: a reference to any iterate it returned or was given.
RefinedMap = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Refinement:
    """A map's refinement around a base state (:meth:`FixedPointMap.refinement`).

    Attributes:
        image: ``f(base)`` in ``base``'s (full) precision.
        corrected: The cheap map for iterates near ``base`` (a :data:`RefinedMap`).
        error_bound: ``error_bound(z, work)`` returns, per sample, a rigorous upper bound
            on ``||corrected(z) - f(z)||`` (``work``: a scratch buffer shaped like ``z``,
            or ``None``) (up to ``f``'s own full-precision rounding, which
            a full-precision check has as well), or ``None``: no bound, so the last check
            of a solve must evaluate ``f`` itself. With a bound a corrected image can
            certify a residual: ``||f(z) - z|| <= ||f~(z) - z|| + e`` and ``||f(z)|| >=
            ||f~(z)|| - e``.
    """

    image: torch.Tensor
    corrected: RefinedMap
    error_bound: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None


#: ``(base, dtype, rows) -> Refinement``: a refinement around ``base`` (see
#: :meth:`FixedPointMap.refinement`), or ``None`` where none is offered
RefinementFn = Callable[[torch.Tensor, torch.dtype, "torch.Tensor | None"], "Refinement | None"]

#: ``grad -> (y -> J^T y + grad)``: the adjoint map for one incoming gradient
AdjointMapFactory = Callable[[torch.Tensor], MapFn]


@dataclass
class LinearizedStep:
    """The differentiable step ``z = f(z*)`` and the adjoint maps of its Jacobian at ``z*``.

    Attributes:
        output: ``f(z*)``, connected by autograd to everything ``f`` closes over (but not
            to ``z*``).
        adjoint: ``adjoint(grad)`` returns the map ``y -> J^T y + grad`` (no graph).
        adjoint_in: ``adjoint_in(dtype, grad)`` returns the same map evaluated in a low
            precision ``dtype`` (for the warm start of the backward solve), or ``None``.
        adjoint_refinement: ``adjoint_refinement(grad)`` returns the adjoint map's
            refinement (a :data:`RefinementFn`, see :meth:`FixedPointMap.refinement`) for
            the iterations after the backward warm phase, or ``None``.
    """

    output: torch.Tensor
    adjoint: AdjointMapFactory
    adjoint_in: Callable[[torch.dtype, torch.Tensor], MapFn] | None = None
    adjoint_refinement: Callable[[torch.Tensor], RefinementFn] | None = None


class FixedPointMap:
    """Base class of a fixed-point map with structure a solver can exploit."""

    #: The map is positive concave (pcDEQ): plain iteration converges to the unique fixed
    #: point from any nonnegative start, so a warm start can only save iterations.
    positive_concave: bool = False

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def refinement(
        self, base: torch.Tensor, dtype: torch.dtype, rows: torch.Tensor | None = None
    ) -> Refinement | None:
        """``f(base)`` in ``base``'s precision and a cheap map for iterates near ``base``.

        The cheap map ``corrected(z, out)`` may compute the part of ``f`` that depends on
        ``z - base`` in the low precision ``dtype``; near ``base`` that part is small, so
        its rounding error is small too (iterative refinement). ``rows`` (an index tensor)
        restricts everything to those samples of the batch. Only ever used between the
        warm phase and the full-precision solve
        (:func:`pcdeq_plugin.warm_start.refine_iterate`); a check made with the corrected
        map needs the refinement's ``error_bound``, otherwise the checks use ``f`` itself.
        Default ``None``: not offered.
        """
        return None

    def in_precision(self, dtype: torch.dtype) -> MapFn:
        """The map evaluated in ``dtype`` (default: the map under ``torch.autocast``)."""
        device_type = None

        def low(z: torch.Tensor) -> torch.Tensor:
            nonlocal device_type
            device_type = device_type or z.device.type
            with torch.autocast(device_type=device_type, dtype=dtype):
                return self(z.to(dtype))

        return low

    def low_precision_pays(self, state: torch.Tensor) -> bool:
        """Whether iterating in low precision is faster than float32 for ``state``.

        Default: the state has at least :data:`MIN_WARM_START_ELEMENTS` elements, so that
        arithmetic, not per-operation overhead, dominates.
        """
        return state.numel() >= MIN_WARM_START_ELEMENTS

    def linearized_step(self, z_star: torch.Tensor) -> LinearizedStep | None:
        """The differentiable step with an analytic adjoint, or ``None`` (use autograd)."""
        return None

    def image_of_zero(self) -> torch.Tensor | None:
        """``f(0)`` where the map knows it without evaluating itself, else ``None``.

        A pcDEQ cell's ``sigma(W 0 + u)`` is ``sigma(u)`` exactly (``W 0 = 0`` in floating
        point): a solve from zero then skips its first linear map or convolution.
        """
        return None
