"""The nonnegativity constraint as a TorchDEQ norm (``apply_norm(model, 'pc_nonneg')``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._common import BRIDGE_MARK

__all__ = ["PARAMETRIZATIONS", "PcNonnegNorm"]

PARAMETRIZATIONS: tuple[str, ...] = ("projection", "softplus")


def _config_get(config: Any, key: str, default: Any) -> Any:
    """Read ``key`` from a dict, an argparse Namespace, a TorchDEQ DEQConfig or None."""
    if config is None:
        return default
    if isinstance(config, Mapping):
        return config.get(key, default)
    if hasattr(config, "config") and isinstance(config.config, Mapping):  # DEQConfig
        return config.config.get(key, default)
    return getattr(config, key, default)


def _row_norm(p: torch.Tensor, dim: int) -> torch.Tensor:
    """Euclidean norm over every dimension except ``dim``, kept broadcastable to ``p``."""
    moved = p.transpose(0, dim)
    norms = moved.reshape(moved.shape[0], -1).norm(dim=1)
    shape = [1] * p.dim()
    shape[dim] = p.shape[dim]
    return norms.view(shape)


class PcNonnegNorm:
    """Nonnegative weights for TorchDEQ's ``apply_norm`` (registered as ``'pc_nonneg'``).

    Parametrizations (``parametrization=`` or config key ``pc_norm_param``):

    * ``"projection"`` (default, the paper's scheme): weight normalisation
      ``W = g * v / max(||v||, eps)`` per output unit with ``v`` and ``g`` projected onto
      ``>= 0`` in place at every :func:`torchdeq.reset_norm` (i.e. before each forward), so
      projected gradient descent needs no extra call in the training loop. The ``eps``
      guard (``pc_eps``) keeps a row of ``v`` that was clamped to all zeros from producing
      NaN, as the paper's code can.
    * ``"softplus"``: ``W = softplus(v)``, nonnegative by construction, no projection.

    ``state_dict`` keys change from ``weight`` to ``weight_v`` (and ``weight_g``).
    :func:`torchdeq.remove_norm` bakes a nonnegative ``weight`` parameter back.

    Pitfalls inherited from TorchDEQ: matching uses the module's *exact* type (register
    your own layer classes with ``torchdeq.register_norm_module(cls, 'pc_nonneg', ...)``);
    ``apply_norm(m, 'pc_nonneg', args=ns)`` is overridden by ``ns.norm_type`` (set
    ``--norm_type pc_nonneg``); keep signed layers (injection, classifier) out with
    ``filter_out=``.
    """

    # Our own dict: ``register_norm_module`` mutates this class attribute.
    _target_modules: dict[type, tuple[Any, Any]] = {
        nn.Linear: ("weight", 0),
        nn.Conv1d: ("weight", 0),
        nn.Conv2d: ("weight", 0),
        nn.Conv3d: ("weight", 0),
        nn.ConvTranspose1d: ("weight", 1),
        nn.ConvTranspose2d: ("weight", 1),
        nn.ConvTranspose3d: ("weight", 1),
    }

    def __init__(self, names: list[str], dims: list[int], parametrization: str, eps: float) -> None:
        self.names = names
        self.dims = dims
        self.parametrization = parametrization
        self.eps = eps

    @classmethod
    def apply(
        cls,
        module: nn.Module,
        deq_args: Any = None,
        names: str | list[str] | None = None,
        dims: int | list[int] | None = None,
        parametrization: str | None = None,
        eps: float | None = None,
        **unused: Any,
    ) -> PcNonnegNorm:
        """Replace ``module.<name>`` by a nonnegative parametrization and return the norm.

        Args:
            module: The layer (its exact type must be a target, unless ``names`` is given).
            deq_args: TorchDEQ config (dict, Namespace, DEQConfig); ``pc_norm_param`` and
                ``pc_eps`` are read from it.
            names: Parameter name(s); default from the target table.
            dims: Output dimension(s) of those parameters.
            parametrization: ``"projection"`` or ``"softplus"`` (wins over ``deq_args``).
            eps: Guard of the row norm (``"projection"`` only).
            **unused: Other keyword options ``apply_norm`` forwards (ignored).
        """
        if names is None or dims is None:
            target = next(
                (cls._target_modules[t] for t in type(module).__mro__ if t in cls._target_modules),
                None,
            )
            if target is None:
                known = ", ".join(sorted(t.__name__ for t in cls._target_modules))
                raise TypeError(
                    f"pc_nonneg does not know which parameters of {type(module).__name__} to "
                    f"constrain; pass names=/dims= or register the class with "
                    f"torchdeq.register_norm_module; known modules: {known}"
                )
            names, dims = target
        names_list = [names] if isinstance(names, str) else list(names)
        dims_list = [dims] * len(names_list) if isinstance(dims, int) else list(dims)
        if len(names_list) != len(dims_list):
            raise ValueError(f"names {names_list} and dims {dims_list} differ in length")
        choice = parametrization or _config_get(deq_args, "pc_norm_param", None) or "projection"
        if choice not in PARAMETRIZATIONS:
            raise ValueError(
                f"unknown pc_nonneg parametrization {choice!r}; choose one of "
                f"{', '.join(PARAMETRIZATIONS)}"
            )
        guard = float(eps if eps is not None else _config_get(deq_args, "pc_eps", 1e-12))
        norm = cls(names_list, dims_list, choice, guard)
        for name in names_list:
            if not isinstance(module._parameters.get(name), nn.Parameter):
                raise ValueError(
                    f"{type(module).__name__}.{name} is not a parameter (is a norm already "
                    "applied? call torchdeq.remove_norm first)"
                )
        for name, dim in zip(names_list, dims_list):
            weight = getattr(module, name).detach()
            del module._parameters[name]
            magnitude = weight.abs()  # keep the scale of the initialisation, drop the signs
            if choice == "projection":
                module.register_parameter(name + "_g", nn.Parameter(_row_norm(magnitude, dim)))
                module.register_parameter(name + "_v", nn.Parameter(magnitude.clone()))
            else:  # inverse softplus, so that W starts at |W_init|
                floor = torch.clamp(magnitude, min=1e-6)
                module.register_parameter(
                    name + "_v", nn.Parameter(floor + torch.log(-torch.expm1(-floor)))
                )
            setattr(module, name, norm.compute_weight(module, name, dim))
        return norm

    def compute_weight(self, module: nn.Module, name: str, dim: int) -> torch.Tensor:
        """The constrained weight, a nonnegative tensor with the parameter's shape."""
        v = getattr(module, name + "_v")
        if self.parametrization == "softplus":
            return F.softplus(v)
        g = getattr(module, name + "_g")
        return g * v / _row_norm(v, dim).clamp_min(self.eps)

    def project(self, module: nn.Module) -> None:
        """Clamp the raw parameters onto ``>= 0`` in place ("projection" only)."""
        if self.parametrization != "projection":
            return
        with torch.no_grad():
            for name in self.names:
                getattr(module, name + "_v").clamp_(min=0.0)
                getattr(module, name + "_g").clamp_(min=0.0)

    def __call__(self, module: nn.Module) -> None:
        """Project, then recompute the weights once (``reset_norm`` calls this per forward)."""
        self.project(module)
        for name, dim in zip(self.names, self.dims):
            setattr(module, name, self.compute_weight(module, name, dim))

    def remove(self, module: nn.Module) -> None:
        """Bake the (nonnegative) weights back into ordinary parameters."""
        self.project(module)
        for name, dim in zip(self.names, self.dims):
            with torch.no_grad():
                weight = self.compute_weight(module, name, dim)
            delattr(module, name)
            for suffix in ("_v", "_g"):
                module._parameters.pop(name + suffix, None)
            module.register_parameter(name, nn.Parameter(weight.detach().clone()))


setattr(PcNonnegNorm, BRIDGE_MARK, True)
