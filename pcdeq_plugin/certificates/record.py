"""What a certificate holds: the checked conditions and the sandwich/contraction numbers."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = ["Certificate", "ConditionCheck"]


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
