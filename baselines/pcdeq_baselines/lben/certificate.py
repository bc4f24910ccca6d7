"""The Lipschitz certificate an LBEN's parametrisation guarantees, in one record."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["LipschitzCertificate", "check_gamma", "fc_lmi_min_eigenvalue"]


def check_gamma(value: Any) -> float | None:
    """``gamma`` for a positive finite number, ``None`` for no bound; else a clear error."""
    if value is None:
        return None
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (number and 0 < value < float("inf")):
        raise ValueError(
            f"gamma must be a positive finite number (the certified Lipschitz bound) or None "
            f"(no bound; null in JSON and on the command line), got {value!r}"
        )
    return float(value)


@dataclass(frozen=True)
class LipschitzCertificate:
    """What the parametrisation guarantees for the current weights.

    Attributes:
        bound: ``gamma``: ``||f(x1) - f(x2)||_2 <= gamma ||x1 - x2||_2`` for the logits ``f``
            and inputs ``x`` as the model receives them (the dataset's normalised space);
            ``None`` when the model was built without a bound.
        guaranteed: Whether the bound holds by construction (always, when ``bound`` is set).
        lmi_min_eigenvalue: Smallest eigenvalue of the paper's Lipschitz LMI matrix for
            the current weights (fully connected models only: a dense check that the
            construction holds in floating point; positive means certified), else ``None``.
        margin_bound: ``sqrt(2) * gamma``, the Lipschitz bound of any logit margin
            ``f_i - f_j``: a correct prediction with margin ``> sqrt(2) gamma eps`` cannot be
            changed by an l2 perturbation of size ``eps``.
    """

    bound: float | None
    guaranteed: bool
    lmi_min_eigenvalue: float | None = None

    @property
    def margin_bound(self) -> float | None:
        return None if self.bound is None else 2**0.5 * self.bound

    def summary(self) -> dict[str, Any]:
        return {
            "lipschitz_bound": self.bound,
            "margin_bound": self.margin_bound,
            "guaranteed": self.guaranteed,
            "lmi_min_eigenvalue": self.lmi_min_eigenvalue,
            "norm": "l2",
            "input_space": "model input (dataset-normalised)",
        }


@torch.no_grad()
def fc_lmi_min_eigenvalue(
    w: torch.Tensor, lam: torch.Tensor, u: torch.Tensor, g: torch.Tensor, gamma: float
) -> float:
    """Smallest eigenvalue of ``[[2L - LW - W^T L - G^T G / gamma, -L U], [-U^T L, gamma I]]``.

    ``L = diag(lam)``; the matrix is positive definite iff the layer is ``gamma``-Lipschitz
    by the paper's incremental quadratic constraint (computed in float64).
    """
    w, lam, u, g = (t.detach().double() for t in (w, lam, u, g))
    lw = lam[:, None] * w
    top = 2 * torch.diag(lam) - lw - lw.T - g.T @ g / gamma
    off = -lam[:, None] * u
    bottom = gamma * torch.eye(u.shape[1], dtype=u.dtype, device=u.device)
    matrix = torch.cat([torch.cat([top, off], 1), torch.cat([off.T, bottom], 1)], 0)
    return float(torch.linalg.eigvalsh(matrix).min())
