"""Numerical verification of a pcDEQ activation before the registry accepts it.

pcDEQ's guarantees (a unique fixed point reached by plain iteration, geometrically) hold
only if the activation sigma is, on the positive orthant ``[0, inf)``:

* finite and elementwise (shape-preserving, each output depends on its own input only);
* nondecreasing;
* concave;
* of the class it claims: ``"nonnegative"`` means sigma(0) = 0 and sigma(t) > 0 for
  t > 0 (pcDEQ-1); ``"positive"`` means sigma(0) > 0 (pcDEQ-2);
* within the upper bound it claims (reaching it is not required, exceeding it is an error).

:func:`verify_activation` checks these on float64 grids of ``[0, T]`` and raises
:class:`ActivationCheckError` naming the condition and the point where it failed. The
grids are uniform (so second differences are exact tests of concavity up to rounding) and
nested: a fine one near 0 where the kinks of ``relu6``, ``hardsigmoid`` or ``min(t, 1)``
live, coarser ones further out, and a sparse logarithmic tail for monotonicity, finiteness
and the bound. A kink that bends *down* (concave) gives a negative second difference and
passes; one that bends *up* (convex) gives a positive one of order ``h`` and fails.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .specs import ActivationSpec

__all__ = [
    "ActivationCheckError",
    "CheckGrid",
    "DEFAULT_GRIDS",
    "asymptotic_slope",
    "verify_activation",
]

# Rounding allowance, in units of the float64 epsilon times the magnitudes involved: a
# correctly implemented concave function may still show differences of a few ulps.
_ULPS = 64.0
# |sigma(0)| below this counts as sigma(0) = 0 for the "nonnegative" class.
_ZERO_AT_ORIGIN = 1e-12


class ActivationCheckError(ValueError):
    """An activation failed a pcDEQ condition.

    Attributes:
        activation: Name of the activation.
        condition: Short name of the failed condition: ``"callable"``, ``"elementwise"``,
            ``"finite"``, ``"nondecreasing"``, ``"concave"``, ``"class"``, ``"bound"`` or
            ``"differentiable"``.
        t: The point of ``[0, inf)`` where it failed, when there is one.
    """

    def __init__(self, activation: str, condition: str, detail: str, t: float | None = None):
        self.activation = activation
        self.condition = condition
        self.t = t
        super().__init__(f"activation {activation!r} refused: {detail}")


@dataclass(frozen=True)
class CheckGrid:
    """A uniform grid ``linspace(0, stop, points)``; ``curvature`` enables the concavity test."""

    stop: float
    points: int
    curvature: bool = True

    def tensor(self) -> torch.Tensor:
        return torch.linspace(0.0, self.stop, self.points, dtype=torch.float64)


#: Step sizes 2.5e-4 on [0, 5], 1e-3 on [0, 20], 2e-2 on [0, 400] and 1 on [0, 1e4].
DEFAULT_GRIDS: tuple[CheckGrid, ...] = (
    CheckGrid(5.0, 20_001),
    CheckGrid(20.0, 20_001),
    CheckGrid(400.0, 20_001),
    CheckGrid(1e4, 10_001),
)
# Far tail: monotonicity, finiteness and the bound only (curvature is invisible here).
_TAIL = torch.logspace(4, 8, 41, dtype=torch.float64)


def _fmt(value: float) -> str:
    return f"{value:.6g}"


def _evaluate(spec: ActivationSpec, t: torch.Tensor) -> torch.Tensor:
    """Call ``spec.fn`` on a copy of ``t`` and check the output is a same-shape float64 tensor."""
    x = t.clone()
    try:
        y = spec.fn(x)
    except Exception as exc:
        raise ActivationCheckError(
            spec.name,
            "callable",
            f"calling it on a float64 tensor of shape {tuple(t.shape)} raised "
            f"{type(exc).__name__}: {exc}",
        ) from exc
    if not isinstance(y, torch.Tensor):
        raise ActivationCheckError(
            spec.name, "elementwise", f"must return a torch.Tensor, got {type(y).__name__}"
        )
    if y.shape != t.shape:
        raise ActivationCheckError(
            spec.name,
            "elementwise",
            f"not shape-preserving: input shape {tuple(t.shape)} gave output shape {tuple(y.shape)}",
        )
    if y.dtype != t.dtype:
        raise ActivationCheckError(
            spec.name, "elementwise", f"changes the dtype: float64 input gave {y.dtype} output"
        )
    if not torch.equal(x, t):
        raise ActivationCheckError(
            spec.name, "elementwise", "modifies its input in place (it must return a new tensor)"
        )
    return y.detach()


def _check_elementwise(spec: ActivationSpec, t: torch.Tensor, y: torch.Tensor) -> None:
    """The same inputs, reshaped to 2-D and split in two, must give the same outputs."""
    n = t.numel() - t.numel() % 4
    grid = t[:n].reshape(4, n // 4)
    reshaped = _evaluate(spec, grid).reshape(-1)
    half = n // 2
    split = torch.cat([_evaluate(spec, t[:half]), _evaluate(spec, t[half:n])])
    reference = y[:n]
    scale = reference.abs().clamp_min(1.0)
    for other, how in ((reshaped, "reshaped to 2-D"), (split, "split in two halves")):
        bad = ((other - reference).abs() > 1e-12 * scale) & ~(other.isnan() & reference.isnan())
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ActivationCheckError(
                spec.name,
                "elementwise",
                f"not elementwise: the value at t = {_fmt(float(t[i]))} changes from "
                f"{_fmt(float(reference[i]))} to {_fmt(float(other[i]))} when the input is {how}",
                float(t[i]),
            )


def _check_finite(spec: ActivationSpec, t: torch.Tensor, y: torch.Tensor) -> None:
    bad = ~torch.isfinite(y)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ActivationCheckError(
            spec.name,
            "finite",
            f"produces a non-finite value {float(y[i])} at t = {_fmt(float(t[i]))}",
            float(t[i]),
        )


def _check_nondecreasing(spec: ActivationSpec, t: torch.Tensor, y: torch.Tensor) -> None:
    step = y[1:] - y[:-1]
    allowance = _ULPS * torch.finfo(torch.float64).eps * (y[1:].abs() + y[:-1].abs())
    bad = step < -allowance
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ActivationCheckError(
            spec.name,
            "nondecreasing",
            f"not nondecreasing on [0, inf): sigma({_fmt(float(t[i + 1]))}) = "
            f"{_fmt(float(y[i + 1]))} < sigma({_fmt(float(t[i]))}) = {_fmt(float(y[i]))}",
            float(t[i]),
        )


def _check_concave(spec: ActivationSpec, t: torch.Tensor, y: torch.Tensor) -> None:
    second = y[2:] - 2.0 * y[1:-1] + y[:-2]
    allowance = (
        _ULPS * torch.finfo(torch.float64).eps * (y[2:].abs() + 2.0 * y[1:-1].abs() + y[:-2].abs())
    )
    bad = second > allowance
    if bool(bad.any()):
        # report the worst violation: the clearest evidence for the user
        i = int(torch.argmax(torch.where(bad, second, torch.zeros_like(second))))
        h = float(t[1] - t[0])
        raise ActivationCheckError(
            spec.name,
            "concave",
            f"not concave on [0, inf): second difference {float(second[i]):.3g} > 0 at "
            f"t = {_fmt(float(t[i + 1]))} (step {h:.3g})",
            float(t[i + 1]),
        )


def _check_class(spec: ActivationSpec, t: torch.Tensor, y: torch.Tensor) -> None:
    at_zero = float(y[0])
    if spec.kind == "nonnegative":
        if abs(at_zero) > _ZERO_AT_ORIGIN:
            raise ActivationCheckError(
                spec.name,
                "class",
                f"claims kind 'nonnegative' (pcDEQ-1, sigma(0) = 0) but sigma(0) = "
                f"{_fmt(at_zero)}; use kind 'positive' if sigma(0) > 0",
                0.0,
            )
        bad = (y[1:] <= 0) & (t[1:] > 0)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0]) + 1
            raise ActivationCheckError(
                spec.name,
                "class",
                f"claims kind 'nonnegative' (pcDEQ-1) which needs sigma(t) > 0 for t > 0, "
                f"but sigma({_fmt(float(t[i]))}) = {_fmt(float(y[i]))}",
                float(t[i]),
            )
    elif at_zero <= 0:
        raise ActivationCheckError(
            spec.name,
            "class",
            f"claims kind 'positive' (pcDEQ-2, sigma(0) > 0) but sigma(0) = {_fmt(at_zero)}; "
            "use kind 'nonnegative' if sigma(0) = 0",
            0.0,
        )


def _check_bound(spec: ActivationSpec, t: torch.Tensor, y: torch.Tensor) -> None:
    bound = float(spec.upper_bound)
    if bound == float("inf"):
        return
    allowance = _ULPS * torch.finfo(torch.float64).eps * abs(bound)
    bad = y > bound + allowance
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ActivationCheckError(
            spec.name,
            "bound",
            f"exceeds its claimed upper bound {_fmt(bound)}: sigma({_fmt(float(t[i]))}) = "
            f"{_fmt(float(y[i]))}",
            float(t[i]),
        )


def _check_differentiable(spec: ActivationSpec) -> None:
    x = torch.linspace(0.0, 2.0, 5, dtype=torch.float64, requires_grad=True)
    try:
        # registries load lazily, possibly inside torch.no_grad() (e.g. a first solve)
        with torch.enable_grad():
            y = spec.fn(x)
            (grad,) = torch.autograd.grad(y.sum(), x)
    except Exception as exc:
        raise ActivationCheckError(
            spec.name,
            "differentiable",
            f"is not differentiable by autograd ({type(exc).__name__}: {exc}); pcDEQ layers "
            "back-propagate through it",
        ) from exc
    if grad is None or grad.shape != x.shape:
        raise ActivationCheckError(spec.name, "differentiable", "autograd returned no gradient")


def verify_activation(
    spec: ActivationSpec, grids: tuple[CheckGrid, ...] = DEFAULT_GRIDS
) -> ActivationSpec:
    """Check numerically that ``spec`` is a valid pcDEQ activation.

    Args:
        spec: The activation to check.
        grids: Uniform grids of ``[0, T]`` to test on (float64). The default goes from a
            step of 2.5e-4 on ``[0, 5]`` to a step of 1 on ``[0, 1e4]``, plus a
            logarithmic tail up to ``1e8`` for monotonicity, finiteness and the bound.

    Returns:
        ``spec`` itself, so the call can be chained.

    Raises:
        TypeError: ``spec`` is not an :class:`~pcdeq_plugin.ActivationSpec`.
        ActivationCheckError: a condition failed; the message names it and the point ``t``
            where it failed, e.g. ``"not concave on [0, inf): second difference 0.12 > 0 at
            t = 1.5"``.
    """
    if not isinstance(spec, ActivationSpec):
        raise TypeError(
            f"an activation must be registered as an ActivationSpec, got {type(spec).__name__}"
        )
    first = grids[0].tensor()
    y_first = _evaluate(spec, first)
    _check_elementwise(spec, first, y_first)
    for grid in grids:
        t = first if grid is grids[0] else grid.tensor()
        y = y_first if grid is grids[0] else _evaluate(spec, t)
        _check_finite(spec, t, y)
        _check_nondecreasing(spec, t, y)
        if grid.curvature:
            _check_concave(spec, t, y)
        _check_class(spec, t, y)
        _check_bound(spec, t, y)
    tail = torch.cat([torch.tensor([grids[-1].stop], dtype=torch.float64), _TAIL])
    y_tail = _evaluate(spec, tail)
    _check_finite(spec, tail, y_tail)
    _check_nondecreasing(spec, tail, y_tail)
    _check_bound(spec, tail, y_tail)
    _check_differentiable(spec)
    return spec


def asymptotic_slope(spec: ActivationSpec) -> float:
    """An upper estimate of ``s = lim sigma(t) / t`` as ``t -> inf`` (0 for a bounded one).

    Boundedness is what makes every pcDEQ map have a fixed point. An unbounded concave
    activation has one only when ``s * rho(W) < 1`` (``s = 1`` for identity and ReLU:
    ``z = relu(z + 0.1)`` grows without bound), so passing :func:`verify_activation` is not
    enough for it; :func:`pcdeq_plugin.certify` checks the product. For a concave
    nondecreasing ``sigma`` a chord slope far out is at least ``s``, so the estimate errs on
    the safe side (``log1p`` gives about 3e-8, identity exactly 1).
    """
    if spec.upper_bound != float("inf"):
        return 0.0
    far = torch.tensor([1e7, 1e8], dtype=torch.float64)
    y = _evaluate(spec, far)
    return max(0.0, float((y[1] - y[0]) / (far[1] - far[0])))
