"""Mixed-precision warm start of forward and adjoint solves.

The first iterations of a solve only need to get close; they can run in bfloat16 (AMX on
recent Xeons, tensor cores on CUDA) or float16 at a fraction of the float32 cost. The
warm phase iterates the map in low precision until every sample's residual is below a
warm tolerance or stops improving (the low precision's floor), projects the forward
state onto the nonnegative orthant, and hands it to the configured float32 solve, which
runs to ``tol`` exactly as from zero. Final residuals, converged flags and the failure
policy therefore come from float32 (or from a rigorous upper bound on the float32
residual, below) and are per sample, as without a warm start.

Why this is safe for pcDEQ: a positive concave map has a unique fixed point and plain
iteration reaches it from **any** nonnegative start (nonlinear Perron-Frobenius theory,
pcdeq.md section 1), so wherever the low-precision phase stops, the float32 phase
converges to the same point; the warm start can only save iterations. The adjoint
iteration ``y <- J^T y + g`` is linear with spectral radius of ``J`` below 1, a
contraction that converges from any start, so its warm start is equally harmless.

After the warm phase, a map that offers it (:meth:`FixedPointMap.refinement
<pcdeq_plugin.maps.FixedPointMap.refinement>`, pcDEQ cells) takes one float32
evaluation at the warm state and iterates a corrected map around it whose low-precision
part only carries the small change ``z - base`` (:func:`refine_iterate`), until the next
float32 evaluation is predicted to meet ``tol``. Plain float32 iteration after the warm
phase needs two evaluations at least (one to leave the low precision's rounding, one to
check). Where the corrections carry a rigorous error bound (pcDEQ-1 and pcDEQ-2 cells,
bfloat16 on the CPU), only the first stays float32: the last check is a correction too,
and a sample passes only if an upper bound on its float32 residual meets ``tol``. Without
a bound all but two become low-precision ones and the float32 solve checks as always.

Why it is not the default for an unconstrained DEQ: a general map may have several
fixed points or none, and iteration may converge only from some starts; a rounded
warm start can land in another basin or where the iteration diverges. ``"auto"``
therefore enables it only for maps that declare the pcDEQ guarantee
(:attr:`~pcdeq_plugin.maps.FixedPointMap.positive_concave`); forcing it on another map
is the caller's decision.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import torch

from .checks import check_choice
from .interface import WARM_START_CHOICES
from .maps import FixedPointMap, MapFn, Refinement
from .residuals import RESIDUAL_EPS, residual_norms, work_buffer

__all__ = [
    "CERTIFY_ATTEMPTS",
    "LOW_PRECISION",
    "RefinedStart",
    "WARM_START_CHOICES",
    "has_fast_bf16",
    "refine_iterate",
    "resolve_warm_start",
    "warm_iterate",
]

LOW_PRECISION: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}

#: The warm phase stops once the worst open residual shrinks by less than this factor per
#: iteration: the low precision's rounding floor has been reached.
STALL_RATIO = 0.7


def has_fast_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` runs bfloat16 matmuls/convolutions faster than float32."""
    device = torch.device(device)
    if device.type == "cpu":
        return _cpu_has_fast_bf16()
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False
        major, _ = torch.cuda.get_device_capability(device)
        return major >= 8  # Ampere and newer: bf16 tensor cores
    return False


@functools.cache
def _cpu_has_fast_bf16() -> bool:  # asked once per solve: the answer never changes
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def resolve_warm_start(
    choice: str, state: torch.Tensor, fn: MapFn | FixedPointMap
) -> torch.dtype | None:
    """The warm-start precision for one solve, or ``None`` for no warm start.

    ``"auto"`` picks bfloat16 for a float32 state of a positive concave map on hardware
    with fast bfloat16, where the map says low precision pays
    (:meth:`~pcdeq_plugin.maps.FixedPointMap.low_precision_pays`: a large state, and for
    pcDEQ cells enough multiply-adds per element); ``"bf16"`` and ``"fp16"`` force it;
    ``"off"`` disables it.
    """
    if choice == "off":
        return None
    if choice in LOW_PRECISION:
        return LOW_PRECISION[choice]
    if choice != "auto":
        check_choice("warm_start", choice, WARM_START_CHOICES)
    if not (isinstance(fn, FixedPointMap) and fn.positive_concave):
        return None
    pays = state.dtype == torch.float32 and fn.low_precision_pays(state)
    return torch.bfloat16 if pays and has_fast_bf16(state.device) else None


def _worst_residual(fz: torch.Tensor, z: torch.Tensor, work: torch.Tensor | None = None) -> float:
    """The largest per-sample residual (NaN if any is), with one synchronisation."""
    diff, image = residual_norms(fz, z, work)
    return float((diff / (image + RESIDUAL_EPS)).max())


def warm_iterate(
    fn: MapFn,
    z0: torch.Tensor,
    *,
    tol: float,
    max_iter: int,
    zero_start: bool = False,
    done: int = 0,
) -> tuple[torch.Tensor, int]:
    """Plain iteration of a low-precision map until it has done what it can.

    Stops when every sample's residual is below ``max(tol, eps / 2)`` (``eps`` of the
    precision), when the worst residual stops improving (rate above :data:`STALL_RATIO`)
    or turns non-finite, or after ``max_iter`` evaluations. Checks are placed where the
    observed rate predicts the tolerance is met (rounded up: an extra low-precision
    iteration is cheaper than a check and only improves the start); ``zero_start`` says
    the solve started at zero, whose residual is 1; ``done`` iterations of it are done
    already (``z0`` is then their result, such as ``f(0)``).

    Returns:
        The last image ``fn(z)`` and the number of evaluations of ``fn`` made here.
    """
    tol = max(tol, torch.finfo(z0.dtype).eps / 2)
    last: tuple[int, float] | None = (1, 1.0) if zero_start else None
    next_check = max(2, done + 1)  # the same iterations as from zero
    z = z0
    k = done
    work = work_buffer(z0)
    for k in range(done + 1, done + max_iter + 1):
        fz = fn(z)
        if k >= next_check:
            worst = _worst_residual(fz, z, work)
            if not worst >= tol:  # NaN stops too
                return fz, k - done
            next_check = k + 1
            if last is not None:
                rate = (worst / last[1]) ** (1.0 / (k - last[0])) if last[1] > 0 else math.inf
                if not rate < STALL_RATIO:  # the precision's floor, or no progress
                    return fz, k - done
                needed = math.ceil(math.log(tol / worst) / math.log(rate))
                next_check = k + min(max(1, needed), max(1, k // 2))  # see CheckSchedule
            last = (k, worst)
        z = fz
    return z, k - done


#: Samples the refinement's probe iterates (evenly spread over the batch; samples
#: converge together, so a few speak for all, at a small fraction of one evaluation).
PROBE_SAMPLES = 2

#: The probe asks the corrected iterations for this fraction of ``tol``, so that samples
#: it did not see, a little slower, still meet ``tol`` at the float32 check.
PROBE_MARGIN = 0.7

#: Certified checks the refinement makes before it hands over to float32 checks: where
#: samples the probe did not see miss ``tol`` at the first, one more correction (cheaper
#: than a float32 evaluation) brings them within it.
CERTIFY_ATTEMPTS = 2

#: Where the probe finds the error bound alone at this fraction of ``tol`` or more, the
#: certified check cannot pass there, and the float32 solve checks instead.
CERTIFY_LOOSE = 0.5

#: ``rows -> Refinement``: a map's refinement at the warm state, of those sample rows
#: (``rows=None``: the whole batch), or ``None`` where it declines
RefinementAt = Callable[["torch.Tensor | None"], "Refinement | None"]


@dataclasses.dataclass
class RefinedStart:
    """What :func:`refine_iterate` hands the float32 solve.

    Attributes:
        state: The iterate to continue from; where ``residual`` is given, the corrected
            image of the last iterate (the solve's answer if every sample passed).
        corrections: Corrected-map evaluations made (the float32 evaluation at the warm
            state not included).
        residual: Per-sample upper bounds on the float32 residual ``||f(z) - z|| /
            (||f(z)|| + eps)`` of the last iterate ``z`` (whose image is ``state``), from a
            corrected image and the refinement's error bound; ``None`` without a bound.
    """

    state: torch.Tensor
    corrections: int
    residual: torch.Tensor | None = None


def refine_iterate(
    refinement: RefinementAt,
    batch: int,
    *,
    tol: float,
    max_iter: int,
    device: torch.device | str = "cpu",
) -> RefinedStart | None:
    """Low-precision corrections after the warm phase, where they replace float32 iterations.

    After the warm phase plain float32 iteration evaluates ``f`` at the warm state (its
    rounding, about 2e-3 in bfloat16, must go) and then until a check meets ``tol``. A
    refinement (:meth:`FixedPointMap.refinement
    <pcdeq_plugin.maps.FixedPointMap.refinement>`) keeps that first evaluation and makes
    the iterations after it corrections, whose low-precision part only carries the small
    change from the warm state. How many are needed is measured first on
    :data:`PROBE_SAMPLES` samples: their corrected iterates until the residual is below
    ``PROBE_MARGIN * tol`` (``tol`` where the check is certified, below; at most
    ``max_iter``). If the corrections stall (rate above
    :data:`STALL_RATIO`: their floor) or turn non-finite, nothing is done (``None``): plain
    float32 iteration follows, as without a refinement. Otherwise the whole batch takes
    the float32 evaluation and that many corrections.

    The last check: where the refinement bounds its error (``Refinement.error_bound``),
    one more correction checks the last iterate ``z``: with ``f~(z)`` its corrected image
    and ``e`` the bound on ``||f~(z) - f(z)||``, the float32 residual is at most
    ``(||f~(z) - z|| + e) / (||f~(z)|| - e)``, per sample, and a sample passes only if that
    bound is below ``tol``, which is stricter than the float32 test itself; where a sample
    misses, up to :data:`CERTIFY_ATTEMPTS` certified checks are made in all. The probe
    checks its samples the same way first; where the bound itself is too loose there
    (:data:`CERTIFY_LOOSE`: a slowly contracting map whose iterates moved far from the
    warm state), the float32 solve checks, as without a bound. Without a bound
    the float32 solve checks ``z`` by evaluating ``f`` (and where the first float32 image
    already meets ``tol``, nothing is done). A misprediction costs iterations, never
    answers.

    Args:
        refinement: The map's refinement at the warm state, by sample rows.
        batch: The batch size.
        tol: The float32 solve's tolerance.
        max_iter: The most corrections to make.
        device: The state's device (where the probe's sample indices go).

    Returns:
        The start of the float32 solve (see :class:`RefinedStart`), or ``None`` (also where
        the map declines).
    """
    rows = torch.linspace(0, batch - 1, min(PROBE_SAMPLES, batch)).round().long().unique()
    rows = rows.to(device)
    offered = refinement(rows)
    if offered is None:
        return None
    certified = offered.error_bound is not None
    budget = max_iter - 1 if certified else max_iter  # the certified check is one more
    z, corrected = offered.image, offered.corrected
    spare = torch.empty_like(z)
    needed, last = None, None
    for k in range(budget + 1):  # z holds the iterate after k corrections
        fz = corrected(z, spare)
        residual = _worst_residual(fz, z)  # of z
        if not math.isfinite(residual):
            return None
        if certified and residual < tol:
            # a miss at the certified check costs a correction, not a float32 evaluation:
            # no margin; but where the bound itself is too loose (a slowly contracting map
            # whose iterates moved far from the base), float32 checks instead
            bound, error = _certified_bound(fz, z, offered.error_bound)
            if float(bound.max()) < tol:
                needed = k
                break
            certified = not float(error.max()) >= CERTIFY_LOOSE * tol
        if not certified and residual < (tol if k == 0 else PROBE_MARGIN * tol):
            needed = k
            break
        if last is not None and not residual < STALL_RATIO * last:
            return None
        z, spare, last = fz, z, residual
    # None: the cap; 0 without a certified check: the first float32 image meets tol, the
    # solver's first evaluation checks it
    if needed is None or (needed == 0 and not certified):
        return None
    offered = refinement(None)
    if offered is None:
        return None
    z, corrected = offered.image, offered.corrected
    spare = torch.empty_like(z)
    for _ in range(needed):
        z, spare = corrected(z, spare), z
    if not certified or offered.error_bound is None:
        return RefinedStart(z, needed)
    corrections = needed
    work = torch.empty_like(z)  # f~(z) - z, then z - base: no allocation per check
    while True:
        fz = corrected(z, spare)
        corrections += 1
        bound, _ = _certified_bound(fz, z, offered.error_bound, work)
        last_attempt = corrections - needed >= CERTIFY_ATTEMPTS or corrections >= max_iter
        if last_attempt or bool((bound < tol).all()):
            return RefinedStart(fz, corrections, bound)
        z, spare = fz, z


def _certified_bound(
    fz: torch.Tensor,
    z: torch.Tensor,
    error_bound: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
    work: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, an upper bound on the float32 residual of ``z`` from its corrected image
    ``fz``: ``(||fz - z|| + e) / (||fz|| - e + eps)`` with ``e`` the refinement's bound on
    ``||fz - f(z)||``; and ``e / ||fz||`` (how much of it is the bound's)."""
    diff, image = residual_norms(fz, z, work)
    error = error_bound(z, work)
    bound = (diff + error) / ((image - error).clamp_min_(0) + RESIDUAL_EPS)
    return bound, error / (image + RESIDUAL_EPS)
