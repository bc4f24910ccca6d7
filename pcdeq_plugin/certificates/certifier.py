"""Certify one pcDEQ block on one batch (conditions, monotone sandwich, contraction), or
every block of a model."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..cells import PcDEQBlock
from ..checks import check_count, check_positive
from .conditions import check_conditions, thompson_distance
from .record import Certificate

__all__ = ["certify", "certify_model"]


def certify(
    block: PcDEQBlock,
    pre_injection: torch.Tensor,
    *,
    steps: int = 200,
    tol: float = 1e-10,
    dtype: torch.dtype | None = torch.float64,
) -> Certificate:
    """Certify a pcDEQ block on a batch of pre-injections (see the module docstring).

    Args:
        block: A :class:`~pcdeq_plugin.PcDEQBlock` (linear or conv).
        pre_injection: ``x~`` as the block receives it (before softplus/ReLU).
        steps: Iteration budget of each sequence.
        tol: The lower sequence counts as converged once its largest step is below
            ``tol`` times its largest entry.
        dtype: Compute dtype (float64 by default, so rounding does not mask monotonicity);
            ``None`` keeps the block's dtype.

    Returns:
        A :class:`Certificate`; ``certificate.ok`` and ``certificate.summary()``.

    Raises:
        TypeError: ``block`` is not a pcDEQ block, or ``dtype`` is not a floating dtype.
        ValueError: ``pre_injection`` has the wrong shape, ``steps < 2`` or ``tol`` is not a
            positive finite number.
    """
    if not isinstance(block, PcDEQBlock):
        raise TypeError(f"certify needs a PcDEQBlock, got {type(block).__name__}")
    check_count("steps", steps, 2)
    check_positive("tol", tol)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(
            f"dtype must be a floating torch.dtype (e.g. torch.float64) or None, got {dtype!r}"
        )
    if not isinstance(pre_injection, torch.Tensor) or not pre_injection.is_floating_point():
        raise TypeError("pre_injection must be a floating-point torch.Tensor")
    block._check_shape(pre_injection)
    spec = block.activation
    notes: list[str] = []

    with torch.no_grad():
        dtype = dtype or pre_injection.dtype
        pre = pre_injection.detach().to(dtype)
        weight = block.weight.detach().to(dtype)
        u = block.injection(pre)
        conditions = check_conditions(block, pre, weight, u)

        def g(z: torch.Tensor) -> torch.Tensor:
            return block.cell(z, u, weight)

        # (b) the monotone sandwich
        bound = spec.upper_bound
        g0 = g(torch.zeros_like(u))
        lower = g0
        upper = None
        if math.isfinite(bound):
            upper = g(torch.full_like(u, bound))
        else:
            notes.append(
                f"{spec.name!r} is unbounded: the upper (decreasing) sequence is skipped, so "
                "only a lower bound of z* is certified"
            )
        lower_monotone, upper_monotone = True, (None if upper is None else True)
        # step 1: z_1 = g(0) >= 0 = z_0 and g(M 1) <= M 1
        if bool((g0 < 0).any()):
            lower_monotone = False
            notes.append("lower sequence decreased at step 1 (g(0) has negative entries)")
        if upper is not None and bool((upper > bound * (1 + 1e-12)).any()):
            upper_monotone = False
            notes.append("upper sequence increased at step 1 (g(M 1) exceeds the bound M)")
        converged, step = False, 1
        for step in range(2, steps + 1):
            new_lower = g(lower)
            slack = 1e-12 * (1 + lower.abs())
            if lower_monotone and bool((new_lower < lower - slack).any()):
                lower_monotone = False
                notes.append(f"lower sequence decreased at step {step}")
            if upper is not None:
                new_upper = g(upper)
                if upper_monotone and bool((new_upper > upper + 1e-12 * (1 + upper.abs())).any()):
                    upper_monotone = False
                    notes.append(f"upper sequence increased at step {step}")
                upper = new_upper
            change = float((new_lower - lower).abs().max())
            scale = float(new_lower.abs().max())
            lower = new_lower
            if not math.isfinite(change):
                notes.append(f"non-finite iterates at step {step}")
                break
            if change <= tol * max(scale, 1e-30):
                converged = upper is None or float((upper - lower).abs().max()) <= tol * max(
                    scale, 1e-30
                )
                if converged:
                    break
        if not converged:
            notes.append(
                f"not converged to {tol:g} within {steps} steps: kappa and the rates are "
                "estimates from the last lower iterate"
            )
        bracket_width = None if upper is None else float((upper - lower).max())
        if upper is not None and bracket_width < -1e-9:
            notes.append("upper sequence ended below the lower one: the bracket is invalid")
            upper_monotone = False

        # (c) contraction in Thompson's metric
        z_star = lower  # the lower sequence approaches z* from below
        positive = bool((z_star > 0).all()) and bool(torch.isfinite(z_star).all())
        if positive:
            kappa = float((g0 / z_star).min())
        else:
            kappa = 0.0 if bool(torch.isfinite(z_star).all()) else float("nan")
            notes.append(
                "z* has nonpositive or non-finite entries: no Thompson contraction certified"
            )
        local_rate = 1.0 - kappa
        empirical, bound_held = None, None
        if positive and lower_monotone:
            empirical, bound_held = _thompson_rates(g, g0, z_star, steps)

        uniform = None
        if spec.kind == "positive" and math.isfinite(bound):
            sigma0 = float(spec.fn(torch.zeros((), dtype=torch.float64)))
            uniform = 1.0 - sigma0 / bound

    return Certificate(
        block=block.block_name,
        variant=block.variant,
        activation=spec.name,
        conditions=conditions,
        steps=step,
        lower_monotone=lower_monotone,
        upper_monotone=upper_monotone,
        bracket_width=bracket_width,
        converged=converged,
        kappa=kappa,
        local_rate=local_rate,
        empirical_rate=empirical,
        thompson_bound_held=bound_held,
        uniform_rate_bound=uniform,
        notes=notes,
        lower=lower,
        upper=upper,
    )


def _thompson_rates(g, g0: torch.Tensor, z_star: torch.Tensor, steps: int):
    """Worst ratio ``d_T(z_{k+1}, z*) / d_T(z_k, z*)`` from ``z_1 = g(0)`` and whether the
    per-step bound ``d_T(g a, z*) <= log(lambda - (lambda - 1) gamma)`` held."""
    # below this distance z* itself (accurate to ~tol) dominates the measurement
    floor = 1e-7
    worst, held = None, True
    z = g0
    d = thompson_distance(z, z_star)
    g_star = g(z_star)
    for _ in range(steps):
        if not bool((d > floor).any()):
            break
        z_next = g(z)
        d_next = thompson_distance(z_next, z_star)
        gamma = torch.minimum(g0 / z_next, g0 / g_star).flatten(1).amin(dim=1)
        lam = torch.exp(d)
        bound = torch.log(lam - (lam - 1) * gamma)
        measured = d > floor
        if bool((d_next[measured] > bound[measured] + 1e-9).any()):
            held = False
        ratio = float((d_next[measured] / d[measured]).max())
        worst = ratio if worst is None else max(worst, ratio)
        z, d = z_next, d_next
    return worst, held


def certify_model(
    model: nn.Module, x: torch.Tensor, *, steps: int = 200, **kwargs: object
) -> list[Certificate]:
    """Certify every pcDEQ block of ``model`` on the batch ``x``.

    Each block's pre-injection is captured with a forward pre-hook during one forward pass,
    run in evaluation mode (BatchNorm uses its running statistics and is not updated)
    without gradients; the model's train/eval flags are restored afterwards.

    Args:
        model: Any module containing :class:`~pcdeq_plugin.PcDEQBlock` blocks.
        x: A batch of model inputs.
        steps: Iteration budget per block (see :func:`certify`).
        **kwargs: Further options of :func:`certify` (``tol``, ``dtype``).

    Returns:
        One :class:`Certificate` per block, in module order.

    Raises:
        ValueError: the model has no pcDEQ block.
    """
    blocks = [m for m in model.modules() if isinstance(m, PcDEQBlock)]
    if not blocks:
        raise ValueError(f"{type(model).__name__} contains no pcDEQ block to certify")
    captured: dict[int, torch.Tensor] = {}

    def capture(module: nn.Module, args: tuple) -> None:
        captured.setdefault(id(module), args[0].detach())

    modes = {m: m.training for m in model.modules()}
    handles = [b.register_forward_pre_hook(capture) for b in blocks]
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.training = mode
    return [certify(b, captured[id(b)], steps=steps, **kwargs) for b in blocks]  # type: ignore[arg-type]
