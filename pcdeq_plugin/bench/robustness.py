"""Adversarial robustness and Lipschitz estimates for any registered model, in plain torch.

Scale of ``eps``: **pixel intensities in [0, 1]**, for every dataset. The harness feeds the
models normalised images (SVHN/CIFAR-10: ``(pixel - mean) / std`` per channel; MNIST and
``mnist5k``: the pixels themselves), so the attacks undo the normalisation, perturb the
pixels, clip them to [0, 1] and normalise again. A dataset this module does not know is
treated as unnormalised (its model inputs are taken to be the pixels).

* ``fgsm``: one step ``eps * sign(grad)`` (l_inf).
* ``pgd-linf`` / ``pgd-l2``: ``steps`` projected gradient-ascent steps on the cross-entropy
  from the clean image (no random start, so ``eps = 0`` is the clean evaluation exactly),
  step size ``2.5 eps / steps``, onto the l_inf / l2 ball of radius ``eps``.

Lipschitz, also in pixel space: the *empirical* value is the largest l2 norm of the
input gradient of the logit margin ``f_y - max_{j != y} f_j`` over the scored images. A
model that certifies ``||f(x1) - f(x2)|| <= gamma ||x1 - x2||`` in its input space
(``model.lipschitz_bound``, e.g. LBEN) is ``gamma_pixel = gamma / min(std)``-Lipschitz
in pixels, each margin is ``sqrt(2) gamma_pixel``-Lipschitz, and a correct prediction is
**certified robust** at radius ``eps`` when

    margin > sqrt(2) * gamma_pixel * r,   r = eps (l2),  r = sqrt(d) * eps (l_inf, d pixels).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pcdeq_plugin.checks import check_choice

from .config import ATTACKS

__all__ = [
    "PixelSpace",
    "attack",
    "check_attack",
    "check_eps",
    "logit_margin",
    "pixel_space",
    "robustness_metrics",
]

#: The attack's norm, for the certified radius.
_NORM = {"fgsm": "linf", "pgd-linf": "linf", "pgd-l2": "l2"}


def check_attack(name: Any) -> str:
    """``name`` if it is a known attack; else ``ValueError`` listing the valid ones."""
    return check_choice("attack", name, ATTACKS)


def check_eps(values: Iterable[Any]) -> list[float]:
    """A non-empty list of finite radii ``>= 0`` (pixel scale)."""
    out = []
    for v in values:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        if not (ok and math.isfinite(v) and v >= 0):
            raise ValueError(
                f"eps must be finite numbers >= 0 (pixel scale, [0, 1] images), got {v!r}"
            )
        out.append(float(v))
    if not out:
        raise ValueError("eps needs at least one radius, e.g. 0.5,1,2")
    return out


class PixelSpace:
    """The dataset's normalisation: ``model input = (pixel - mean) / std`` per channel."""

    def __init__(self, mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        self.mean = None if mean is None else torch.tensor(mean).view(1, -1, 1, 1)
        self.std = None if std is None else torch.tensor(std).view(1, -1, 1, 1)

    @property
    def min_std(self) -> float:
        return 1.0 if self.std is None else float(self.std.min())

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        if self.std is None:
            return x
        return x * self.std.to(x) + self.mean.to(x)

    def to_inputs(self, p: torch.Tensor) -> torch.Tensor:
        if self.std is None:
            return p
        return (p - self.mean.to(p)) / self.std.to(p)


def pixel_space(dataset: str) -> PixelSpace:
    """The normalisation the harness applies to ``dataset`` (none if unknown)."""
    from .datasets import CIFAR10_NORM, SVHN_NORM

    norms = {"svhn": SVHN_NORM, "cifar10": CIFAR10_NORM, "cifar10-aug": CIFAR10_NORM}
    return PixelSpace(*norms[dataset]) if dataset in norms else PixelSpace()


def logit_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``f_y - max_{j != y} f_j`` per sample (positive iff correctly classified)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf"))
    return true - others.amax(dim=1)


def _loss_grad(model: nn.Module, space: PixelSpace, p: torch.Tensor, y: torch.Tensor):
    p = p.detach().requires_grad_()
    loss = F.cross_entropy(model(space.to_inputs(p)).float(), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, p)
    return grad


def _per_sample(t: torch.Tensor) -> torch.Tensor:
    return t.view(-1, *([1] * (t.dim() - 1))) if t.dim() == 1 else t


def attack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    kind: str,
    eps: float,
    space: PixelSpace | None = None,
    steps: int = 10,
) -> torch.Tensor:
    """Adversarial *model inputs* for the batch ``(x, y)`` (``x`` as the model receives it).

    The model should be in eval mode (BatchNorm statistics must not move).
    """
    check_attack(kind)
    space = space or PixelSpace()
    clean = space.to_pixels(x.detach())
    if eps == 0:
        return x.detach()
    if kind == "fgsm":
        grad = _loss_grad(model, space, clean, y)
        return space.to_inputs((clean + eps * grad.sign()).clamp(0, 1))
    step = 2.5 * eps / steps
    p = clean
    for _ in range(steps):
        grad = _loss_grad(model, space, p, y)
        if kind == "pgd-linf":
            p = p + step * grad.sign()
            p = clean + (p - clean).clamp(-eps, eps)
        else:
            norm = grad.flatten(1).norm(dim=1).clamp(min=1e-12)
            p = p + step * grad / _per_sample(norm).view(-1, *[1] * (grad.dim() - 1))
            delta = p - clean
            dn = delta.flatten(1).norm(dim=1).clamp(min=1e-12)
            factor = (eps / dn).clamp(max=1.0)
            p = clean + delta * factor.view(-1, *[1] * (delta.dim() - 1))
        p = p.clamp(0, 1)
    return space.to_inputs(p.detach())


def _margin_gradient_norms(model: nn.Module, space: PixelSpace, x: torch.Tensor, y: torch.Tensor):
    p = space.to_pixels(x.detach()).requires_grad_()
    margins = logit_margin(model(space.to_inputs(p)).float(), y)
    (grad,) = torch.autograd.grad(margins.sum(), p)  # samples are independent
    return grad.flatten(1).norm(dim=1), margins.detach()


def robustness_metrics(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    kind: str,
    eps: Sequence[float],
    space: PixelSpace | None = None,
    steps: int = 10,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Clean and adversarial accuracy/loss, empirical and certified Lipschitz, certified
    accuracy (see the module docstring for the scales and the formula).

    Returns:
        ``attack``, ``eps_scale`` (``"pixel"``), ``clean_acc``, ``clean_loss``,
        ``lipschitz_empirical`` (largest margin-gradient norm), ``lipschitz_bound``
        (certified logit bound in pixel space, or ``None``), and per radius
        ``adversarial[i] = {"eps", "acc", "loss", "certified_acc"}``.
    """
    check_attack(kind)
    radii = check_eps(eps)
    space = space or PixelSpace()
    model.eval()
    bound = getattr(model, "lipschitz_bound", None)
    bound_pixel = None if bound is None else float(bound) / space.min_std
    n, correct, loss = 0, 0, 0.0
    adv = {r: {"correct": 0, "loss": 0.0, "certified": 0} for r in radii}
    lip = 0.0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        grad_norms, margins = _margin_gradient_norms(model, space, x, y)
        lip = max(lip, float(grad_norms.max()))
        with torch.no_grad():
            logits = model(x).float()
        n += len(y)
        correct += int((logits.argmax(1) == y).sum())
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        dims = x[0].numel()
        for r in radii:
            x_adv = attack(model, x, y, kind=kind, eps=r, space=space, steps=steps)
            with torch.no_grad():
                out = model(x_adv).float()
            adv[r]["correct"] += int((out.argmax(1) == y).sum())
            adv[r]["loss"] += float(F.cross_entropy(out, y, reduction="sum"))
            if bound_pixel is not None:
                radius = r if _NORM[kind] == "l2" else r * math.sqrt(dims)
                adv[r]["certified"] += int((margins > math.sqrt(2) * bound_pixel * radius).sum())
    if n == 0:
        raise ValueError("robustness_metrics: no test images were given")
    return {
        "attack": kind,
        "norm": _NORM[kind],
        "eps_scale": "pixel",
        "steps": steps if kind != "fgsm" else 1,
        "images": n,
        "clean_acc": correct / n,
        "clean_loss": loss / n,
        "lipschitz_empirical": lip,
        "lipschitz_bound": bound_pixel,
        "adversarial": [
            {
                "eps": r,
                "acc": a["correct"] / n,
                "loss": a["loss"] / n,
                "certified_acc": None if bound_pixel is None else a["certified"] / n,
            }
            for r, a in adv.items()
        ],
    }
