"""Runtime certificates for pcDEQ blocks (pcdeq.md sections 1.6-1.8).

:func:`certify` checks, for one block and one batch of pre-injections:

(a) the **conditions** of the theory: ``W >= 0``, an activation that passes the numerical
    checks and fits the variant, the injection sign (``u > 0`` for pcDEQ-1, ``u >= 0`` for
    pcDEQ-2), finite inputs, and that a fixed point exists at all (automatic for a bounded
    activation; for an unbounded one its slope at infinity times the Collatz-Wielandt bound
    of ``rho(W)`` must be below 1) -- naming where a condition fails;
(b) the **monotone sandwich**: iterates from ``0`` rise and iterates from ``M 1`` (``M`` the
    activation's bound) fall, so together they bracket the fixed point componentwise; for an
    unbounded activation the upper sequence is skipped;
(c) the **contraction** in Thompson's metric ``d_T(a, b) = max_i |log a_i - log b_i|``:
    ``kappa = min_i g(0)_i / z*_i`` gives the local rate ``1 - kappa``; the empirical ratio
    ``d_T(z_{k+1}, z*) / d_T(z_k, z*)`` along the iteration; the bound
    ``d_T(g a, g b) <= log(lambda - (lambda - 1) gamma)`` checked at every step; and, for a
    positive bounded activation, the weight-independent bound ``1 - sigma(0) / M``
    (``1/2`` for sigmoid).

(The module is named ``certificates`` so that it does not shadow the public function
``pcdeq_plugin.certify``.)

Everything runs without gradients, in float64 by default, on copies of the block's tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .cells import PcDEQBlock
from .checks import check_count, check_positive

__all__ = [
    "Certificate",
    "ConditionCheck",
    "certify",
    "certify_model",
    "spectral_radius_bounds",
    "thompson_distance",
]


@dataclass
class ConditionCheck:
    """One checked condition: its name, whether it holds, and what was found."""

    name: str
    ok: bool
    detail: str


@dataclass
class Certificate:
    """What :func:`certify` found for one block on one batch.

    Attributes:
        block: Block name.
        variant: pcDEQ variant (1 or 2).
        activation: Activation name.
        conditions: The checked conditions (weight sign, activation, injection, inputs).
        steps: Iterations run by the sandwich.
        lower_monotone: Iterates from 0 were componentwise nondecreasing.
        upper_monotone: Iterates from ``M 1`` were nonincreasing (``None``: skipped).
        bracket_width: ``max_i (upper_i - lower_i)`` after the last step (``None``: skipped).
        converged: The lower sequence reached its tolerance within ``steps``.
        kappa: ``min_i g(0)_i / z*_i`` over the batch (worst sample).
        local_rate: ``1 - kappa``, the asymptotic Thompson contraction factor bound.
        empirical_rate: Worst observed ``d_T(z_{k+1}, z*) / d_T(z_k, z*)`` (``None`` if no
            step was far enough from ``z*`` to measure it).
        thompson_bound_held: The per-step bound of section 1.7 held at every measured step.
        uniform_rate_bound: ``1 - sigma(0) / M`` for a positive bounded activation (1/2 for
            sigmoid), valid for every ``W >= 0`` and input; ``None`` otherwise.
        notes: Remarks (skipped parts, estimates, failures).
        lower: Last lower iterate (a componentwise lower bound of ``z*``).
        upper: Last upper iterate (upper bound of ``z*``), or ``None``.
    """

    block: str
    variant: int
    activation: str
    conditions: list[ConditionCheck]
    steps: int
    lower_monotone: bool
    upper_monotone: bool | None
    bracket_width: float | None
    converged: bool
    kappa: float
    local_rate: float
    empirical_rate: float | None
    thompson_bound_held: bool | None
    uniform_rate_bound: float | None
    notes: list[str] = field(default_factory=list)
    lower: torch.Tensor | None = field(default=None, repr=False)
    upper: torch.Tensor | None = field(default=None, repr=False)

    @property
    def conditions_ok(self) -> bool:
        return all(c.ok for c in self.conditions)

    @property
    def failed(self) -> list[str]:
        """Names of everything that failed (conditions, monotonicity, contraction)."""
        names = [c.name for c in self.conditions if not c.ok]
        if not self.lower_monotone:
            names.append("lower_monotone")
        if self.upper_monotone is False:
            names.append("upper_monotone")
        if self.thompson_bound_held is False:
            names.append("thompson_bound")
        if self.empirical_rate is not None and not self.empirical_rate < 1:
            names.append("contraction")
        if not math.isfinite(self.local_rate):
            names.append("finite_iterates")
        if not self.converged:
            # never "OK" for a solve that did not reach its fixed point
            names.append("not_converged")
        return names

    @property
    def ok(self) -> bool:
        """Every condition holds and the iteration behaved as the theory says."""
        return not self.failed

    def summary(self) -> str:
        """A readable multi-line report."""
        head = f"pcDEQ certificate for {self.block} (pcDEQ-{self.variant}, {self.activation}): " + (
            "OK" if self.ok else "FAILED: " + ", ".join(self.failed)
        )
        lines = [head, "  conditions:"]
        lines += [f"    [{'ok' if c.ok else 'FAIL'}] {c.name}: {c.detail}" for c in self.conditions]
        upper = {None: "skipped", True: "yes", False: "NO"}[self.upper_monotone]
        width = "n/a" if self.bracket_width is None else f"{self.bracket_width:.3e}"
        lines.append(
            f"  sandwich after {self.steps} steps: lower nondecreasing "
            f"{'yes' if self.lower_monotone else 'NO'}, upper nonincreasing {upper}, "
            f"bracket width {width}, converged {'yes' if self.converged else 'no'}"
        )
        empirical = "n/a" if self.empirical_rate is None else f"{self.empirical_rate:.4f}"
        bound = {None: "n/a", True: "held", False: "VIOLATED"}[self.thompson_bound_held]
        lines.append(
            f"  contraction (Thompson metric): kappa {self.kappa:.4g}, local rate <= "
            f"{self.local_rate:.4f}, empirical rate {empirical}, per-step bound {bound}"
        )
        if self.uniform_rate_bound is not None:
            lines.append(
                f"  uniform rate bound for every W >= 0: {self.uniform_rate_bound:.4g} "
                "(1 - sigma(0)/sup sigma)"
            )
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def thompson_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``d_T(a, b) = max_i |log a_i - log b_i|`` per sample (over all non-batch dims)."""
    return (torch.log(a) - torch.log(b)).abs().flatten(1).amax(dim=1)


def _where(index: torch.Tensor, shape: torch.Size) -> str:
    """A readable position ``sample 3, index (2, 0, 1)`` of a flat index."""
    coords = torch.unravel_index(index, shape)
    sample, rest = int(coords[0]), tuple(int(c) for c in coords[1:])
    return f"sample {sample}, index {rest if len(rest) != 1 else rest[0]}"


def _check_conditions(
    block: PcDEQBlock, pre: torch.Tensor, weight: torch.Tensor, u: torch.Tensor
) -> list[ConditionCheck]:
    from .activation_checks import verify_activation

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
    checks.append(_check_existence(block, pre, weight))
    return checks


def _check_existence(block: PcDEQBlock, pre: torch.Tensor, weight: torch.Tensor) -> ConditionCheck:
    """A fixed point exists: sigma bounded, or slope at infinity times rho(W) below 1."""
    from .activation_checks import ActivationCheckError, asymptotic_slope

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
        conditions = _check_conditions(block, pre, weight, u)

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
