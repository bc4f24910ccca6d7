"""pcDEQ blocks: ``z* = sigma(W z* + u)``, linear and convolutional, variants 1 and 2.

A block receives the *pre-injection* ``x~`` (computed outside the DEQ by an unconstrained
affine layer and BatchNorm), turns it into the injection ``u``, and returns the fixed point
of ``g_x(z) = sigma(W z + u)`` with implicit gradients:

* pcDEQ-1: ``sigma(0) = 0`` and ``u = softplus_beta(x~) > 0`` (beta = 5 as in the paper).
  Strict positivity matters: with ``u = 0`` the state ``z = 0`` is a fixed point and a
  second, positive one may coexist.
* pcDEQ-2: ``sigma(0) > 0`` and ``u = ReLU(x~) >= 0``; ``sigma(0)`` keeps the state positive.

``W >= 0`` is a parametrization of the recurrent module (:mod:`pcdeq_plugin.constraints`)
projected by :meth:`PcDEQBlock.after_optimizer_step`; the solve starts at ``z0 = 0``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .activations import VARIANT_KINDS, resolve_activation
from .cell_map import PcDEQCellMap
from .checks import (
    ArgumentError,
    all_finite,
    check_count,
    check_flag,
    check_positive,
    is_count,
    is_finite_number,
)
from .constraints import (
    NonNegativeConstraint,
    apply_constraint,
    initialize_nonnegative_,
    project_nonnegative_,
)
from .implicit import make_solvers, solve_implicit
from .interface import ImplicitBlock, SolverConfig
from .registry import ActivationSpec, get_activation
from .residuals import LOW_PRECISION

__all__ = ["DEFAULT_ACTIVATIONS", "PcDEQBlock", "PcDEQConv", "PcDEQLinear"]

#: activation used when only the variant is given
DEFAULT_ACTIVATIONS: dict[int, str] = {1: "tanh", 2: "sigmoid"}


def _resolve_variant(
    variant: int | None, activation: str | ActivationSpec | None
) -> tuple[int, ActivationSpec]:
    """The variant and the checked activation spec; each may be inferred from the other."""
    if variant is None:
        if activation is None:
            variant = 1
        elif isinstance(activation, ActivationSpec):
            variant = activation.variant
        elif isinstance(activation, str):
            variant = get_activation(activation).variant
        else:
            raise TypeError(
                f"activation must be a registered name or an ActivationSpec, got {activation!r}"
            )
    if isinstance(variant, bool) or variant not in VARIANT_KINDS:  # True == 1 is no variant
        raise ArgumentError(f"unknown pcDEQ variant {variant!r}; choose 1 or 2")
    if activation is None:
        activation = DEFAULT_ACTIVATIONS[variant]
    return variant, resolve_activation(activation, variant)


class PcDEQBlock(ImplicitBlock):
    """Base class of a pcDEQ block around a bias-free recurrent module ``operator``.

    Args:
        operator: Bias-free ``nn.Linear(N, N)`` or ``nn.Conv2d(N, N, k, padding=k//2)``;
            its weight is re-initialised and constrained to be nonnegative.
        variant: ``1`` (softplus injection, ``sigma(0) = 0``) or ``2`` (ReLU injection,
            ``sigma(0) > 0``). ``None``: taken from the activation's kind (default 1).
        activation: Registered activation name or :class:`ActivationSpec`; default ``tanh``
            for variant 1, ``sigmoid`` for variant 2.
        beta: Softplus sharpness of the pcDEQ-1 injection (the paper uses 5).
        injection_floor: Added to the injection (default 0, as the paper). A floor
            ``eps > 0`` keeps ``u >= eps`` even where softplus underflows, which bounds
            ``kappa = min g(0)/z*`` away from 0 and so makes the worst-case pcDEQ-1
            contraction rate explicit (pcdeq.md section 5).
        constraint: Nonnegativity scheme (``"weight_norm"``, ``"guarded_weight_norm"``,
            ``"softplus"``, ``"clamp"``) or a :class:`NonNegativeConstraint`.
        config: Forward/backward solver configuration (default: plain fixed-point
            iteration, tol 1e-4, 200 iterations, as the paper).
        init_scale: Scale of the official initialisation ``U[0,1) sqrt(s)/sqrt(n0+n1)``.
        check_inputs: Raise on NaN/Inf pre-injections (one host synchronisation per call).
        name: Block name used in statistics and messages.

    Raises:
        ValueError: unknown variant or constraint, or an activation that does not fit.
        UnknownNameError: unknown activation or solver name (the message lists the
            available ones).
        TypeError: solver options the named solver does not take.
    """

    def __init__(
        self,
        operator: nn.Module,
        *,
        variant: int | None = None,
        activation: str | ActivationSpec | None = None,
        beta: float = 5.0,
        injection_floor: float = 0.0,
        constraint: str | NonNegativeConstraint = "weight_norm",
        config: SolverConfig | None = None,
        init_scale: float = 1e-4,
        check_inputs: bool = True,
        name: str | None = None,
    ) -> None:
        super().__init__(name)
        self.variant, self.activation = _resolve_variant(variant, activation)
        check_positive("beta", beta)
        if not (is_finite_number(injection_floor) and injection_floor >= 0):
            raise ArgumentError(
                f"injection_floor must be a finite number >= 0, got {injection_floor!r}"
            )
        check_flag("check_inputs", check_inputs)  # bool("no") would silently mean True
        if config is None:
            config = SolverConfig()
        if not isinstance(config, SolverConfig):
            raise TypeError(f"config must be a SolverConfig, got {type(config).__name__}")
        # resolve the solver names and options now, so a typo fails at construction (with
        # the registered names) rather than at the first forward pass; the pair is reused
        self._solvers = make_solvers(config)
        self.beta = float(beta)
        self.injection_floor = float(injection_floor)
        self.config = config
        self.check_inputs = bool(check_inputs)
        self.operator = operator
        initialize_nonnegative_(operator.weight, init_scale)
        self.constraint_scheme = apply_constraint(operator, constraint).scheme

    # -- the map ------------------------------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        """The current nonnegative recurrent weight ``W`` (computed from the parametrization)."""
        return self.operator.weight

    def linear_map(self, z: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """``W z`` for a state ``z`` (``weight`` defaults to :attr:`weight`)."""
        raise NotImplementedError

    def transposed_map(self, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``W^T y``: the adjoint of :meth:`linear_map`."""
        raise NotImplementedError

    def operand(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` in the form :meth:`pre_activation` takes (computed once per solve)."""
        return weight

    def operator_norm_bound(self, weight: torch.Tensor) -> float:
        """An upper bound on the spectral norm of :meth:`linear_map` (and its transpose).

        The Schur test ``||A||_2 <= sqrt(||A||_1 ||A||_inf)`` with the largest absolute row
        and column sums of ``A``: for a dense layer and a stride-1 zero-padded convolution
        every entry of ``weight[o, i, ...]`` appears at most once in output ``o``'s row and
        in input ``i``'s column, so the sums of ``|weight|`` over all dimensions but the
        output (input) one bound them. One reduction of the weight and one host
        synchronisation; the relative slack covers float32 summation.
        """
        magnitude = weight.detach().float().abs()
        dims = tuple(range(magnitude.dim()))
        rows = magnitude.sum(dim=tuple(d for d in dims if d != 0)).max()
        cols = magnitude.sum(dim=tuple(d for d in dims if d != 1)).max()
        return float((rows * cols).sqrt()) * (1.0 + 1e-5)

    def weight_gradient(
        self, z: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor
    ) -> torch.Tensor:
        """``d<grad, W z>/dW``: the weight gradient of :meth:`linear_map` at ``z``.

        Default: by autograd through one evaluation; subclasses give it directly.
        """
        with torch.enable_grad():
            leaf = weight.detach().requires_grad_()
            (result,) = torch.autograd.grad(self.linear_map(z, leaf), leaf, grad)
        return result

    def pre_activation(
        self, z: torch.Tensor, u: torch.Tensor, operand: torch.Tensor
    ) -> torch.Tensor:
        """``a = W z + u`` from :meth:`operand` (subclasses fuse the addition where they can).

        Must return a new tensor: the solve applies the activation to it in place.
        """
        return self.linear_map(z, operand) + u

    def adjoint_map(
        self, slope: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """``y -> W^T (slope * y) + grad``: one backward iteration of the analytic adjoint."""
        return lambda y: self.transposed_map(slope * y, weight) + grad

    def injection(self, pre_injection: torch.Tensor) -> torch.Tensor:
        """``u = softplus_beta(x~)`` (pcDEQ-1, strictly positive) or ``ReLU(x~)`` (pcDEQ-2),
        plus :attr:`injection_floor`."""
        if self.variant == 1:
            u = F.softplus(pre_injection, beta=self.beta)
        else:
            u = F.relu(pre_injection)
        return u + self.injection_floor if self.injection_floor else u

    def cell(
        self, z: torch.Tensor, u: torch.Tensor, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One application of ``g_x(z) = sigma(W z + u)``."""
        return self.activation.fn(self.linear_map(z, weight) + u)

    def check_pre_injection(self, x: torch.Tensor) -> None:
        """Raise a clear error for a non-tensor, a wrong shape or NaN/Inf values."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(
                f"{self.block_name}: input must be a floating-point torch.Tensor, got "
                f"{type(x).__name__ if not isinstance(x, torch.Tensor) else x.dtype}"
            )
        self._check_shape(x)
        if self.check_inputs and not all_finite(x):
            bad = int((~torch.isfinite(x)).sum())
            raise ValueError(
                f"{self.block_name}: input contains {bad} NaN/Inf value(s); pcDEQ needs a "
                "finite pre-injection"
            )

    def _check_shape(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    # -- forward ------------------------------------------------------------------------
    def forward(self, pre_injection: torch.Tensor) -> torch.Tensor:
        """Fixed point ``z* = sigma(W z* + u(x~))`` from ``z0 = 0``, with implicit gradients.

        Args:
            pre_injection: ``x~``, shaped like the state (``[B, N]`` or ``[B, C, H, W]``).

        Returns:
            ``z*`` with the shape of the input; ``self.last_stats`` holds the solve records.
        """
        self.check_pre_injection(pre_injection)
        if pre_injection.dtype in LOW_PRECISION:  # autocast upstream: the block solves in fp32
            pre_injection = pre_injection.float()
        u = self.injection(pre_injection)
        # cached(): W is computed once per solve; reading it here, in the caller's grad
        # mode, keeps its graph to the parametrization's tensors for the one
        # differentiable step (a first read inside the no-grad solve would cache a W
        # without a graph). The map holds W itself, so the backward hook reuses it.
        with parametrize.cached():
            cell_map = PcDEQCellMap(self, u, self.weight)
            return solve_implicit(
                cell_map,
                u.detach(),  # the template of the state: the solve starts from zero
                self.config,
                self.last_stats,
                solvers=self._solvers,
                zero_start=True,
            )

    def after_optimizer_step(self) -> None:
        """Project the recurrent weight back onto ``W >= 0`` (no-op for ``softplus``)."""
        project_nonnegative_(self.operator)

    def extra_repr(self) -> str:
        return (
            f"variant={self.variant}, activation={self.activation.name!r}, beta={self.beta:g}, "
            f"injection_floor={self.injection_floor:g}, "
            f"constraint={self.constraint_scheme!r}, solver={self.config.solver!r}"
        )


class PcDEQLinear(PcDEQBlock):
    """Dense pcDEQ block: ``z* = sigma(W z* + u)``, ``W`` an ``N x N`` nonnegative matrix.

    Args:
        features: State size ``N``; the input is ``[B, N]``.
        **kwargs: See :class:`PcDEQBlock`.
    """

    def __init__(self, features: int, **kwargs: Any) -> None:
        check_count("features", features)
        kwargs.setdefault("name", f"PcDEQLinear({features})")
        super().__init__(nn.Linear(features, features, bias=False), **kwargs)
        self.features = features
        self.macs_per_element = features  # multiply-adds of W z per state element

    def linear_map(self, z: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(z, self.weight if weight is None else weight)

    def transposed_map(self, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return y @ weight

    def operand(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.t()

    def weight_gradient(
        self, z: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor
    ) -> torch.Tensor:
        return grad.t().mm(z)  # W z for rows z: d/dW = grad^T z

    def pre_activation(
        self, z: torch.Tensor, u: torch.Tensor, operand: torch.Tensor
    ) -> torch.Tensor:
        return torch.addmm(u, z, operand)  # one kernel for W z + u

    def adjoint_map(
        self, slope: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda y: torch.addmm(grad, slope * y, weight)

    def _check_shape(self, x: torch.Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != self.features:
            raise ValueError(
                f"{self.block_name}: expected input of shape [batch, {self.features}], got "
                f"{list(x.shape)}" + (" (flatten image inputs first)" if x.dim() > 2 else "")
            )


class PcDEQConv(PcDEQBlock):
    """Convolutional pcDEQ block: ``W`` a bias-free ``k x k`` convolution, zero padding ``k//2``.

    A convolution with a nonnegative kernel and zero padding is a linear map with a
    nonnegative matrix, so the pcDEQ theory applies unchanged.

    Args:
        channels: State channels ``C``; the input is ``[B, C, H, W]``.
        kernel_size: Odd kernel size (the paper uses 3).
        **kwargs: See :class:`PcDEQBlock`.
    """

    def __init__(self, channels: int, kernel_size: int = 3, **kwargs: Any) -> None:
        check_count("channels", channels)
        if not (is_count(kernel_size) and kernel_size % 2 == 1):
            raise ArgumentError(f"kernel_size must be an odd integer >= 1, got {kernel_size!r}")
        kwargs.setdefault("name", f"PcDEQConv({channels})")
        conv = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, bias=False)
        super().__init__(conv, **kwargs)
        self.channels = channels
        self.kernel_size = kernel_size
        self.macs_per_element = channels * kernel_size**2  # of W z per state element

    def linear_map(self, z: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        return F.conv2d(z, self.weight if weight is None else weight, padding=self.kernel_size // 2)

    def transposed_map(self, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # stride 1 and "same" zero padding: the transposed convolution is the adjoint
        return F.conv_transpose2d(y, weight, padding=self.kernel_size // 2)

    def adjoint_map(
        self, slope: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        pad = self.kernel_size // 2
        scaled = torch.empty_like(slope)  # slope * y of every iteration, in one buffer

        def adjoint(y: torch.Tensor) -> torch.Tensor:
            # the sum in place on the transposed convolution's fresh output
            torch.mul(slope, y, out=scaled)
            return F.conv_transpose2d(scaled, weight, padding=pad).add_(grad)

        return adjoint

    def weight_gradient(
        self, z: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor
    ) -> torch.Tensor:
        pad = self.kernel_size // 2  # the convolution's own weight gradient, no forward
        return torch.ops.aten.convolution_backward(
            grad, z, weight, None, [1, 1], [pad, pad], [1, 1], False, [0, 0], 1,
            [False, True, False],
        )[1]  # fmt: skip

    def pre_activation(
        self, z: torch.Tensor, u: torch.Tensor, operand: torch.Tensor
    ) -> torch.Tensor:
        # in place on the convolution's fresh output (its backward does not need it): one
        # allocation per iteration instead of two
        return F.conv2d(z, operand, padding=self.kernel_size // 2).add_(u)

    def _check_shape(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(
                f"{self.block_name}: expected input of shape [batch, {self.channels}, height, "
                f"width], got {list(x.shape)}"
            )
