"""The conditions of the theory for one block, Thompson's metric and bounds of ``rho(W)``.

Each condition is checked on its own and reported with where it fails (pcdeq.md 1.6).
"""

from __future__ import annotations

import math

import torch

from ..cells import PcDEQBlock
from .record import ConditionCheck

__all__ = ["check_conditions", "check_existence", "spectral_radius_bounds", "thompson_distance"]


def thompson_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``d_T(a, b) = max_i |log a_i - log b_i|`` per sample (over all non-batch dims)."""
    return (torch.log(a) - torch.log(b)).abs().flatten(1).amax(dim=1)


def _where(index: torch.Tensor, shape: torch.Size) -> str:
    """A readable position ``sample 3, index (2, 0, 1)`` of a flat index."""
    coords = torch.unravel_index(index, shape)
    sample, rest = int(coords[0]), tuple(int(c) for c in coords[1:])
    return f"sample {sample}, index {rest if len(rest) != 1 else rest[0]}"


def check_conditions(
    block: PcDEQBlock, pre: torch.Tensor, weight: torch.Tensor, u: torch.Tensor
) -> list[ConditionCheck]:
    from ..activation_checks import verify_activation

    checks: list[ConditionCheck] = []
    finite = torch.isfinite(pre)
    if bool(finite.all()):
        checks.append(ConditionCheck("finite_input", True, "all pre-injections are finite"))
    else:
        first = torch.nonzero(~finite.flatten())[0, 0]
        checks.append(
            ConditionCheck(
                "finite_input",
                False,
                f"{int((~finite).sum())} NaN/Inf pre-injection(s), first at "
                f"{_where(first, pre.shape)}",
            )
        )

    negative = ~(weight >= 0)  # NaN counts as a violation
    if not bool(negative.any()):
        checks.append(
            ConditionCheck("nonnegative_weight", True, f"W >= 0 (min {float(weight.min()):.3g})")
        )
    else:
        flat = torch.nonzero(negative.flatten())[0, 0]
        pos = tuple(int(c) for c in torch.unravel_index(flat, weight.shape))
        checks.append(
            ConditionCheck(
                "nonnegative_weight",
                False,
                f"{int(negative.sum())} negative or NaN entries of W, first W{list(pos)} = "
                f"{float(weight.flatten()[flat]):.3g}; the map is then not order-preserving",
            )
        )

    spec = block.activation
    try:
        with torch.enable_grad():  # the checks include a differentiability test
            verify_activation(spec)
    except (ValueError, TypeError) as exc:
        checks.append(ConditionCheck("activation", False, str(exc)))
    else:
        needed = "nonnegative" if block.variant == 1 else "positive"
        if spec.kind != needed:
            checks.append(
                ConditionCheck(
                    "activation",
                    False,
                    f"{spec.name!r} is of kind {spec.kind!r} but pcDEQ-{block.variant} needs "
                    f"{needed!r}",
                )
            )
        else:
            checks.append(
                ConditionCheck(
                    "activation",
                    True,
                    f"{spec.name!r} is nondecreasing, concave and {spec.kind} on [0, inf)",
                )
            )

    if block.variant == 1:
        bad, rule = ~(u > 0), "u > 0 (pcDEQ-1: sigma(0) = 0, so u = 0 makes z = 0 a fixed point)"
    else:
        bad, rule = ~(u >= 0), "u >= 0 (pcDEQ-2)"
    if not bool(bad.any()):
        checks.append(ConditionCheck("injection", True, f"{rule}; min u = {float(u.min()):.3g}"))
    else:
        first = torch.nonzero(bad.flatten())[0, 0]
        checks.append(
            ConditionCheck(
                "injection",
                False,
                f"{int(bad.sum())} entries violate {rule}, first at {_where(first, u.shape)} "
                f"(u = {float(u.flatten()[first]):.3g})",
            )
        )
    checks.append(check_existence(block, pre, weight))
    return checks


def check_existence(block: PcDEQBlock, pre: torch.Tensor, weight: torch.Tensor) -> ConditionCheck:
    """A fixed point exists: sigma bounded, or slope at infinity times rho(W) below 1."""
    from ..activation_checks import ActivationCheckError, asymptotic_slope

    spec = block.activation
    if math.isfinite(spec.upper_bound):
        return ConditionCheck(
            "fixed_point_exists",
            True,
            f"sigma is bounded by {spec.upper_bound:.4g}, so the iterates stay in a bounded box",
        )
    try:
        slope = asymptotic_slope(spec)
    except ActivationCheckError as exc:
        return ConditionCheck("fixed_point_exists", False, str(exc))
    low, high = spectral_radius_bounds(block, pre.shape[1:], weight)
    product = slope * high
    detail = (
        f"sigma is unbounded with slope <= {slope:.3g} at infinity and "
        f"{low:.4g} <= rho(W) <= {high:.4g}: slope * rho(W) <= {product:.4g}"
    )
    if product < 1:
        return ConditionCheck("fixed_point_exists", True, detail + " < 1")
    return ConditionCheck(
        "fixed_point_exists",
        False,
        detail + " is not below 1, so a fixed point is not guaranteed (the iterates may grow "
        "without bound); use a bounded activation or scale W down",
    )


def spectral_radius_bounds(
    block: PcDEQBlock, state_shape: torch.Size, weight: torch.Tensor, iterations: int = 200
) -> tuple[float, float]:
    """Collatz-Wielandt bounds ``min_i (Wv)_i / v_i <= rho(W) <= max_i (Wv)_i / v_i`` of the
    nonnegative operator ``z -> W z`` on states of ``state_shape``, with ``v > 0`` refined
    by power iteration. Valid for every positive ``v``, so the upper bound is a certificate
    even when the iteration has not settled."""
    v = torch.ones((1, *state_shape), dtype=weight.dtype, device=weight.device)
    low, high = 0.0, math.inf
    for _ in range(iterations):
        w = block.linear_map(v, weight)
        ratio = w / v
        low, high = max(low, float(ratio.min())), min(high, float(ratio.max()))
        if high - low <= 1e-9 * max(high, 1e-30):
            break
        # keep v strictly positive (a reducible W would otherwise zero some entries)
        v = w / float(w.max()) + 1e-12 if float(w.max()) > 0 else v
    return low, high
