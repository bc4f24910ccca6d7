"""The nonnegativity constraint as a TorchDEQ norm (``apply_norm(model, 'pc_nonneg')``)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_choice
from ._common import BRIDGE_MARK
from .norm_targets import PC_NONNEG_TARGETS, PcNonnegTargets, names_and_dims
from .normed_weight import NormedWeight, nonnegative

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
      ``W = g * v / max(||v||, eps)`` per output unit, computed from ``max(v, 0)`` and
      ``max(g, 0)`` (so ``W >= 0`` always) with the gradient of projected gradient
      descent; ``v`` and ``g`` themselves are projected onto ``>= 0`` in place (under
      ``no_grad``) at every :func:`torchdeq.reset_norm`, i.e. before each forward, so the
      training loop needs no extra call. No autograd node saves ``v`` or ``g``, so that
      projection never invalidates a graph: several forwards may share one backward.
      The ``eps`` guard (``pc_eps``) keeps an all-zero row of ``v`` from producing NaN.
    * ``"softplus"``: ``W = softplus(v)``, nonnegative by construction, no projection.

    Everything a training script relies on works as with TorchDEQ's own norms, and more:
    ``copy.deepcopy(model)`` (EMA; the copy's weight is rebuilt from the copy's
    parameters), pickling, also by ``torch.multiprocessing`` (the weight travels as
    values; ``reset_norm`` rebuilds it), ``state_dict``/``load_state_dict`` (keys
    ``weight_v`` and ``weight_g`` replace ``weight``; loading recomputes the weight), and
    :func:`torchdeq.remove_norm` (bakes a nonnegative ``weight`` parameter back).

    Which layers: every module whose type *or a base class* is in the target table
    (``nn.Linear``, convolutions and transposed convolutions); add your own layer type
    with :func:`register_pc_nonneg_module`. ``apply_norm`` warns, or with
    ``pc_norm_missing='error'`` raises, when it would constrain nothing. Keep signed
    layers (injection, classifier) out with ``filter_out=``. TorchDEQ pitfall:
    ``apply_norm(m, 'pc_nonneg', args=ns)`` is overridden by ``ns.norm_type`` (set
    ``--norm_type pc_nonneg``).
    """

    # Our own table: ``register_norm_module(cls, 'pc_nonneg', ...)`` and
    # ``register_pc_nonneg_module`` write into it.
    _target_modules: PcNonnegTargets = PC_NONNEG_TARGETS

    def __init__(self, names: list[str], dims: list[int], parametrization: str, eps: float) -> None:
        self.names = names
        self.dims = dims
        self.parametrization = parametrization
        self.eps = eps
        self._load_hook: int | None = None

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
            module: The layer (its type or a base class must be a target, unless ``names``
                is given).
            deq_args: TorchDEQ config (dict, Namespace, DEQConfig); ``pc_norm_param`` and
                ``pc_eps`` are read from it.
            names: Parameter name(s); default from the target table.
            dims: Output dimension(s) of those parameters.
            parametrization: ``"projection"`` or ``"softplus"`` (wins over ``deq_args``).
            eps: Guard of the row norm (``"projection"`` only).
            **unused: Other keyword options ``apply_norm`` forwards (ignored).
        """
        if names is None or dims is None:
            target = cls._target_modules.lookup(type(module))
            if target is None:
                known = ", ".join(sorted(t.__name__ for t in cls._target_modules))
                raise TypeError(
                    f"pc_nonneg does not know which parameters of {type(module).__name__} to "
                    "constrain; pass names=/dims= or register the class with "
                    "pcdeq_plugin.torchdeq_bridge.register_pc_nonneg_module(cls, names, dims); "
                    f"known modules: {known}"
                )
            names, dims = target
        names_list, dims_list = names_and_dims(names, dims)
        choice = parametrization or _config_get(deq_args, "pc_norm_param", None) or "projection"
        check_choice("pc_nonneg parametrization", choice, PARAMETRIZATIONS)
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
        # a bound method (not a closure): deep copies and pickles carry it with the norm
        norm._load_hook = module.register_load_state_dict_post_hook(norm._after_load).id
        return norm

    def _weight(self, dim: int, v: torch.Tensor, g: torch.Tensor | None = None) -> NormedWeight:
        if self.parametrization == "softplus":
            value = F.softplus(v)
        else:
            v_pos, g_pos = nonnegative(v), nonnegative(g)
            value = g_pos * v_pos / _row_norm(v_pos, dim).clamp_min(self.eps)
        sources = (v,) if g is None else (v, g)
        return NormedWeight.wrap(value, functools.partial(self._weight, dim), sources)

    def compute_weight(self, module: nn.Module, name: str, dim: int) -> torch.Tensor:
        """The constrained weight, a nonnegative tensor with the parameter's shape."""
        v = getattr(module, name + "_v")
        if self.parametrization == "softplus":
            return self._weight(dim, v)
        return self._weight(dim, v, getattr(module, name + "_g"))

    def project(self, module: nn.Module) -> None:
        """Clamp the raw parameters onto ``>= 0`` in place ("projection" only).

        Safe at any time: the weight is computed from copies (:func:`nonnegative`), so no
        autograd graph holds these parameters' values.
        """
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

    def _after_load(self, module: nn.Module, incompatible_keys: Any) -> None:
        # load_state_dict changed (or, with assign=True, replaced) the raw parameters
        self(module)

    def remove(self, module: nn.Module) -> None:
        """Bake the (nonnegative) weights back into ordinary parameters."""
        self.project(module)
        for name, dim in zip(self.names, self.dims):
            with torch.no_grad():
                weight = self.compute_weight(module, name, dim)
            delattr(module, name)
            for suffix in ("_v", "_g"):
                module._parameters.pop(name + suffix, None)
            plain = torch.Tensor.detach(weight).as_subclass(torch.Tensor).clone()
            module.register_parameter(name, nn.Parameter(plain))
        if self._load_hook is not None:
            module._load_state_dict_post_hooks.pop(self._load_hook, None)
            self._load_hook = None


setattr(PcNonnegNorm, BRIDGE_MARK, True)
