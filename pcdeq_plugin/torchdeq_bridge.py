"""``register('pcdeq')``: pcDEQ inside an existing TorchDEQ codebase.

After ``pcdeq_plugin.register()`` a TorchDEQ program selects pcDEQ by name::

    import pcdeq_plugin
    from torchdeq import get_deq, apply_norm, reset_norm

    pcdeq_plugin.register()                          # solver 'pcdeq', norm 'pc_nonneg'
    deq = get_deq(f_solver="pcdeq", b_solver="pcdeq", f_stop_mode="rel", ift=True)
    apply_norm(layer, "pc_nonneg", filter_out=["inj"])   # recurrent weights W >= 0
    reset_norm(layer)                                # at the top of every forward
    z_out, info = deq(lambda z: layer(z, x), z0)

What is registered (TorchDEQ 0.1.0 keeps process-global dicts with silent overwrite):

* solver ``name`` (default ``"pcdeq"``): :func:`pcdeq_solver`, plain fixed-point iteration
  (what the pcDEQ theory guarantees to converge) on TorchDEQ's exact solver contract. It
  never clamps iterates, so it also solves the *signed* adjoint problem TorchDEQ hands a
  ``b_solver``; it pads the trajectory to ``len(indexing)`` when it stops early, which keeps
  implicit differentiation alive under TorchDEQ's ``indexing`` core.
* norm ``norm_name`` (default ``"pc_nonneg"``): :class:`PcNonnegNorm`, nonnegative
  recurrent weights through TorchDEQ's norm protocol (``apply_norm``/``reset_norm``/
  ``remove_norm``).
* core ``name`` (default ``"pcdeq"``, optional for users): TorchDEQ's default ``DEQSliced``
  core that starts every solve from the nonnegative orthant (it clamps ``z_init >= 0``, the
  precondition of pcDEQ's convergence guarantee) and warns once when the forward solver is
  an extrapolating one (``anderson``, ``broyden``) that may leave the orthant. Solver,
  core and norm names live in separate TorchDEQ dicts, so sharing ``"pcdeq"`` is fine.

:func:`register` is idempotent and thread-safe, recognises its own entries even after a
module reload, refuses to replace an entry that is not ours (and TorchDEQ's built-ins
always), and must run in *every* process: TorchDEQ's registries are not inherited by
spawned DataLoader workers, ``mp.spawn`` children or torchrun ranks. Call it at the top
level of the module that defines your model, not under ``if __name__ == "__main__":``.

TorchDEQ 0.1.0 defects handled here: early stop under the indexing core (trajectory
padding), caller's config mutated by ``get_deq``/``apply_norm`` (:func:`pcdeq_deq_kwargs`
returns a fresh dict), unknown config keys silently ignored (:func:`pcdeq_deq_kwargs`
raises), ``--b_solver`` restricted to built-ins (:func:`add_pcdeq_args`).
"""

from __future__ import annotations

import argparse
import difflib
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "PARAMETRIZATIONS",
    "STOP_MODES",
    "PcNonnegNorm",
    "TorchDEQRegistrationError",
    "add_pcdeq_args",
    "pcdeq_defaults",
    "pcdeq_deq_kwargs",
    "pcdeq_core_class",
    "pcdeq_solver",
    "register",
]

STOP_MODES: tuple[str, ...] = ("abs", "rel")
PARAMETRIZATIONS: tuple[str, ...] = ("projection", "softplus")
DEFAULT_SOLVER_NAME = "pcdeq"
DEFAULT_NORM_NAME = "pc_nonneg"

# TorchDEQ 0.1.0's own entries: never replaced, whatever ``overwrite`` says.
TORCHDEQ_BUILTINS: dict[str, frozenset[str]] = {
    "solver": frozenset({"anderson", "broyden", "fixed_point_iter", "simple_fixed_point_iter"}),
    "norm": frozenset({"weight_norm", "spectral_norm", "none"}),
    "core": frozenset({"sliced", "indexing"}),
}
# forward solvers whose extrapolation can leave the nonnegative orthant
_ORTHANT_LEAVING = frozenset({"anderson", "broyden"})
# Our own config keys (TorchDEQ's namespace is flat; ours all start with ``pc_``).
PC_KEYS: dict[str, str] = {
    "pc_norm_param": "parametrization of pc_nonneg: " + " | ".join(PARAMETRIZATIONS),
    "pc_eps": "lower guard of the row norm in the 'projection' parametrization",
    "pc_activation": "registered pcDEQ activation for your layers (pcdeq_plugin.list_activations())",
    "pc_beta": "softplus beta of the pcDEQ-1 injection",
}
# Keys people pass believing TorchDEQ reads them (issue #12 and friends).
_MISLEADING_KEYS: dict[str, str] = {
    "stop_mode": "TorchDEQ reads 'f_stop_mode' and 'b_stop_mode'",
    "max_iter": "TorchDEQ reads 'f_max_iter' and 'b_max_iter'",
    "tol": "TorchDEQ reads 'f_tol' and 'b_tol'",
    "solver": "TorchDEQ reads 'f_solver' and 'b_solver'",
    "no_stat": "get_deq ignores it (it is a constructor argument only)",
    "solver_kwargs": "pass solver options at call time: deq(f, z0, solver_kwargs={...})",
}

_LOCK = threading.RLock()
_BRIDGE_MARK = "__pcdeq_bridge__"


class TorchDEQRegistrationError(ValueError):
    """A TorchDEQ registry entry is taken by something that is not pcdeq-plugin's."""


def _torchdeq() -> Any:
    """Import TorchDEQ, or explain how to get it."""
    try:
        import torchdeq
        import torchdeq.core
        import torchdeq.norm.base_norm
        import torchdeq.solver
        import torchdeq.solver.stat
    except ImportError as exc:
        raise ImportError(
            "the TorchDEQ bridge needs the 'torchdeq' package (version 0.1.0), which could not "
            f"be imported ({exc}); install it with: pip install 'torchdeq==0.1.0'"
        ) from exc
    return torchdeq


# --------------------------------------------------------------------------------------
# The solver
# --------------------------------------------------------------------------------------


def _batch_flatten(x: torch.Tensor) -> torch.Tensor:
    # TorchDEQ's batch rule: dim 0 is the batch; a 0-d or 1-d state is one sample per element
    return x.flatten(start_dim=1) if x.dim() >= 2 else x.reshape(-1, 1)


def _per_sample(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a ``[B]`` mask against a state shaped like ``like``."""
    if like.dim() >= 2:
        return mask.view(-1, *([1] * (like.dim() - 1)))
    return mask.view(like.shape)


def pcdeq_solver(
    func: Callable[[torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    max_iter: int = 50,
    tol: float = 1e-4,
    stop_mode: str = "rel",
    indexing: list[int] | None = None,
    return_final: bool = False,
    **kwargs: Any,
) -> tuple[torch.Tensor, list[torch.Tensor], dict[str, torch.Tensor]]:
    """Plain fixed-point iteration ``z <- func(z)`` on TorchDEQ's solver contract.

    Args:
        func: The map; called with one positional tensor shaped like ``x0``.
        x0: Initial state ``[B, ...]`` (a 0-d or 1-d tensor counts each element as a sample).
            It is *not* projected onto the nonnegative orthant: as a ``b_solver`` this solves
            the signed adjoint problem from ``x0 = 0``.
        max_iter: Iteration cap (0 returns ``x0``).
        tol: Stop when the largest per-sample residual of ``stop_mode`` is below it.
        stop_mode: ``'abs'`` (``||f(z) - z||``) or ``'rel'`` (divided by ``||f(z)|| + 1e-9``).
        indexing: Steps whose (best-so-far) state goes into the trajectory. On early stop the
            missing entries are the final state, so ``len(trajectory) == len(indexing)``.
        return_final: Run all ``max_iter`` steps and return the last iterate instead of the
            per-sample best.
        **kwargs: Ignored (TorchDEQ and its forks pass extra solver options).

    Returns:
        ``(z_best, trajectory, info)``: ``z_best`` detached, shaped like ``x0``;
        ``trajectory`` a list of ``len(indexing or [])`` states; ``info`` a TorchDEQ
        ``SolverStat`` with ``abs_lowest``, ``rel_lowest`` ``(B,)``, ``abs_trace``,
        ``rel_trace`` ``(B, max_iter + 1)`` (padded after an early stop, as TorchDEQ's own
        ``fixed_point_iter``), ``nstep`` ``(B,)`` (1-based step of the best iterate) and
        ``pc_min`` ``(B,)``, the smallest entry of each sample's state (negative values
        flag a violated pcDEQ assumption in the forward solve).

    Raises:
        ValueError: unknown ``stop_mode``, negative ``max_iter``, or ``func`` changed the shape.
    """
    if stop_mode not in STOP_MODES:
        raise ValueError(f"unknown stop_mode {stop_mode!r}; choose one of {', '.join(STOP_MODES)}")
    if int(max_iter) != max_iter or max_iter < 0:
        raise ValueError(f"max_iter must be an integer >= 0, got {max_iter!r}")
    solver_stat = _torchdeq().solver.stat.SolverStat
    max_iter = int(max_iter)
    wanted = [int(i) for i in indexing] if indexing else []

    x = x0.detach()
    bsz = _batch_flatten(x).shape[0]
    dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
    big = torch.full((bsz,), 1e8, dtype=dtype, device=x.device)
    lowest = {mode: big.clone() for mode in STOP_MODES}
    lowest_step = {mode: torch.zeros(bsz, dtype=dtype, device=x.device) for mode in STOP_MODES}
    trace: dict[str, list[torch.Tensor]] = {mode: [big.clone()] for mode in STOP_MODES}
    best = x.clone()
    snapshots: dict[int, torch.Tensor] = {}

    for k in range(max_iter):
        fx = func(x)
        if fx.shape != x.shape:
            raise ValueError(
                f"func changed the state shape from {tuple(x.shape)} to {tuple(fx.shape)}"
            )
        fx = fx.detach()
        abs_res = _batch_flatten(fx - x).norm(dim=1).to(dtype)
        rel_res = abs_res / (_batch_flatten(fx).norm(dim=1).to(dtype) + 1e-9)
        residual = {"abs": abs_res, "rel": rel_res}
        for mode in STOP_MODES:
            trace[mode].append(residual[mode])
            improved = residual[mode] < lowest[mode]
            if return_final:
                improved = torch.ones_like(improved)
            if mode == stop_mode:
                best = torch.where(_per_sample(improved, best), fx, best)
            lowest[mode] = torch.where(improved, residual[mode], lowest[mode])
            lowest_step[mode] = torch.where(
                improved, torch.full_like(lowest_step[mode], k + 1), lowest_step[mode]
            )
        if k + 1 in wanted:
            snapshots[k + 1] = best.clone()
        x = fx
        # NaN residuals compare False: a diverged sample never counts as converged
        if not return_final and bool(residual[stop_mode].max() < tol):
            break

    for mode in STOP_MODES:  # fixed-shape logs: pad the trace to max_iter + 1 entries
        trace[mode].extend([lowest[mode]] * (max_iter + 1 - len(trace[mode])))
    trajectory = [snapshots.get(i, best) for i in wanted]
    info = solver_stat(
        abs_lowest=lowest["abs"],
        rel_lowest=lowest["rel"],
        abs_trace=torch.stack(trace["abs"], dim=1),
        rel_trace=torch.stack(trace["rel"], dim=1),
        nstep=lowest_step[stop_mode],
    )
    info["pc_min"] = _batch_flatten(best).min(dim=1).values
    return best, trajectory, info


setattr(pcdeq_solver, _BRIDGE_MARK, True)


# --------------------------------------------------------------------------------------
# The nonnegativity constraint as a TorchDEQ norm
# --------------------------------------------------------------------------------------


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


setattr(PcNonnegNorm, _BRIDGE_MARK, True)


# --------------------------------------------------------------------------------------
# The optional core
# --------------------------------------------------------------------------------------

_CORE_CLASS: type | None = None


def _clamp_nonnegative(z: Any) -> Any:
    if isinstance(z, (tuple, list)):
        return type(z)(_clamp_nonnegative(t) for t in z)
    if not isinstance(z, torch.Tensor):
        raise TypeError(
            f"z_init must be a tensor or a tuple/list of tensors, got {type(z).__name__}"
        )
    return z.clamp_min(0.0)


def pcdeq_core_class() -> type:
    """The ``DEQSliced`` subclass registered as core ``'pcdeq'`` (built on first use)."""
    global _CORE_CLASS
    with _LOCK:
        if _CORE_CLASS is not None:
            return _CORE_CLASS
        from torchdeq.core import DEQSliced

        class PcDEQCore(DEQSliced):
            """TorchDEQ's sliced core, started in the nonnegative orthant for pcDEQ maps.

            ``forward(func, z_init, ...)`` clamps ``z_init`` (a tensor, or a tuple/list of
            tensors) to ``>= 0`` and otherwise behaves exactly like ``DEQSliced``; the
            initial state may also be passed as ``z_star=`` (the parent's parameter name).
            """

            __pcdeq_bridge__ = True

            def __init__(self, args: Any = None, **kwargs: Any) -> None:
                super().__init__(args, **kwargs)
                solver = self.args.get("f_solver", "fixed_point_iter")
                if solver in _ORTHANT_LEAVING:
                    warnings.warn(
                        f"core 'pcdeq' with f_solver={solver!r}: its extrapolation may leave "
                        "the nonnegative orthant, where pcDEQ's convergence guarantee does not "
                        "apply; prefer f_solver='pcdeq' (or 'fixed_point_iter')",
                        RuntimeWarning,
                        stacklevel=3,
                    )

            def forward(self, func: Any, z_init: Any = None, *args: Any, **kwargs: Any) -> Any:
                if z_init is None:
                    z_init = kwargs.pop("z_star", None)
                if z_init is None:
                    raise TypeError("core 'pcdeq' needs an initial state: deq(func, z_init)")
                return super().forward(func, _clamp_nonnegative(z_init), *args, **kwargs)

        _CORE_CLASS = PcDEQCore
        return PcDEQCore


# --------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------


def _describe(obj: object) -> str:
    module = getattr(obj, "__module__", None) or type(obj).__module__
    qualname = getattr(obj, "__qualname__", None) or type(obj).__qualname__
    return f"{module}.{qualname}"


def _claim(kind: str, table: dict[str, Any], key: str, ours: object, overwrite: bool) -> None:
    """Check that ``table[key]`` may hold ``ours``; raise otherwise (nothing is written)."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"a TorchDEQ {kind} name must be a non-empty string, got {key!r}")
    if key in TORCHDEQ_BUILTINS[kind]:
        raise TorchDEQRegistrationError(
            f"{key!r} is TorchDEQ's built-in {kind}; pcdeq-plugin never replaces it; "
            f"choose another name (built-in {kind}s: {', '.join(sorted(TORCHDEQ_BUILTINS[kind]))})"
        )
    existing = table.get(key)
    if existing is None or existing is ours or getattr(existing, _BRIDGE_MARK, False):
        return  # free, or ours (possibly from before a module reload): idempotent
    if not overwrite:
        raise TorchDEQRegistrationError(
            f"TorchDEQ {kind} {key!r} is already registered to {_describe(existing)}, which is "
            f"not pcdeq-plugin's; pick another name or pass overwrite=True to replace it"
        )


def register(
    name: str = DEFAULT_SOLVER_NAME,
    *,
    norm_name: str = DEFAULT_NORM_NAME,
    overwrite: bool = False,
) -> dict[str, str]:
    """Register the pcDEQ solver, the nonnegativity norm and the pcDEQ core into TorchDEQ.

    Idempotent and thread-safe; call it in every process (at import of your model code).

    Args:
        name: TorchDEQ solver name for :func:`pcdeq_solver` (``f_solver``/``b_solver``) and
            core name for :func:`pcdeq_core_class` (``core``).
        norm_name: TorchDEQ norm name for :class:`PcNonnegNorm` (``apply_norm``).
        overwrite: Replace an entry of that name registered by someone else. TorchDEQ's
            built-in names are never replaced.

    Returns:
        The names registered, ``{"solver": name, "norm": norm_name, "core": name}``.

    Raises:
        ImportError: TorchDEQ is not importable (the message says how to install it).
        TorchDEQRegistrationError: a name is a TorchDEQ built-in, or is taken by another
            object and ``overwrite`` is false. Nothing is registered then.
    """
    torchdeq = _torchdeq()
    solvers = torchdeq.solver._solvers
    norms = torchdeq.norm.base_norm._norm_class
    cores = torchdeq.core._core
    with _LOCK:
        core = pcdeq_core_class()
        _claim("solver", solvers, name, pcdeq_solver, overwrite)
        _claim("norm", norms, norm_name, PcNonnegNorm, overwrite)
        _claim("core", cores, name, core, overwrite)
        torchdeq.solver.register_solver(name, pcdeq_solver)
        torchdeq.norm.base_norm.register_norm(norm_name, PcNonnegNorm)
        torchdeq.core.register_deq(name, core)
    return {"solver": name, "norm": norm_name, "core": name}


# --------------------------------------------------------------------------------------
# Configuration helpers
# --------------------------------------------------------------------------------------


def _deq_keys() -> set[str]:
    """Every key TorchDEQ 0.1.0's ``add_deq_args`` defines (they cover all keys it reads)."""
    parser = argparse.ArgumentParser(add_help=False)
    _torchdeq().add_deq_args(parser)
    return {action.dest for action in parser._actions}


def pcdeq_defaults(name: str = DEFAULT_SOLVER_NAME) -> dict[str, Any]:
    """Recommended TorchDEQ settings for pcDEQ layers (a new dict; merge your own on top).

    Plain iteration forward and backward (the pcDEQ theory covers both: the Jacobian at
    the fixed point has spectral radius below one), a per-sample relative forward stop as
    in the paper, and implicit differentiation through ``autograd.Function`` (not the
    hook variant, which recurses when one DEQ module is used twice in a graph).
    """
    return {
        "f_solver": name,
        "b_solver": name,
        "f_stop_mode": "rel",
        "f_tol": 1e-4,
        "f_max_iter": 200,
        "b_stop_mode": "abs",
        "b_tol": 1e-6,
        "b_max_iter": 200,
        "ift": True,
    }


def _config_dict(args: Any) -> dict[str, Any]:
    if args is None:
        return {}
    if isinstance(args, Mapping):
        return dict(args)
    if isinstance(args, argparse.Namespace):
        return dict(vars(args))
    if hasattr(args, "config") and isinstance(args.config, Mapping):  # DEQConfig
        return dict(args.config)
    raise TypeError(
        f"args must be a dict, an argparse.Namespace or a torchdeq DEQConfig, got {type(args).__name__}"
    )


def pcdeq_deq_kwargs(args: Any = None, **overrides: Any) -> dict[str, Any]:
    """A validated, fresh TorchDEQ config: ``get_deq(pcdeq_deq_kwargs(args, **kw))``.

    TorchDEQ 0.1.0 ignores unknown keys silently and writes into the caller's dict or
    Namespace. This returns a *new* dict (``args`` is copied, never modified) after
    checking it:

    * every key in ``overrides`` must be a TorchDEQ key or one of ours (``pc_*``);
    * in ``args`` (which may hold your own unrelated settings) keys that look like a
      TorchDEQ key but are not one (``stop_mode``, ``f_anderson_m``...) are refused;
    * ``f_stop_mode``/``b_stop_mode`` must be ``'abs'`` or ``'rel'``; solver, core and
      norm names must be registered in TorchDEQ.

    Raises:
        TypeError: unknown key (the message suggests the closest valid one).
        ValueError: a value TorchDEQ would fail on later.
    """
    torchdeq = _torchdeq()
    valid = _deq_keys() | set(PC_KEYS)
    config = _config_dict(args)
    suspicious = [
        key
        for key in config
        if key not in valid
        and (key in _MISLEADING_KEYS or key.startswith(("f_", "b_", "norm_", "pc_")))
    ]
    unknown = sorted(set(suspicious) | (set(overrides) - valid))
    if unknown:
        details = []
        for key in unknown:
            hint = _MISLEADING_KEYS.get(key)
            if hint is None:
                close = difflib.get_close_matches(key, sorted(valid), n=2)
                hint = f"did you mean {' or '.join(map(repr, close))}?" if close else "no such key"
            details.append(f"{key!r} ({hint})")
        raise TypeError(
            f"unknown TorchDEQ config key(s): {'; '.join(details)}; TorchDEQ would silently "
            f"ignore them. Valid keys: {', '.join(sorted(valid))}"
        )
    config.update(overrides)
    for key in ("f_stop_mode", "b_stop_mode"):
        if key in config and config[key] not in STOP_MODES:
            raise ValueError(f"{key} must be one of {', '.join(STOP_MODES)}, got {config[key]!r}")
    tables = {
        "f_solver": ("solver", torchdeq.solver._solvers),
        "b_solver": ("solver", torchdeq.solver._solvers),
        "core": ("core", torchdeq.core._core),
        "norm_type": ("norm", {"none": None, **torchdeq.norm.base_norm._norm_class}),
    }
    for key, (kind, table) in tables.items():
        if key in config and config[key] not in table:
            raise ValueError(
                f"{key}={config[key]!r} is not a registered TorchDEQ {kind}; available: "
                f"{', '.join(sorted(table))} (pcDEQ's are added by pcdeq_plugin.register())"
            )
    if config.get("b_solver") == "simple_fixed_point_iter" and (
        config.get("ift") or config.get("hook_ift")
    ):
        raise ValueError(
            "b_solver='simple_fixed_point_iter' crashes under implicit differentiation in "
            "TorchDEQ 0.1.0 (it passes tau= to the adjoint map); use 'fixed_point_iter' or 'pcdeq'"
        )
    return config


class _LiveChoices:
    """argparse ``choices`` that read a registry at parse time (so later registrations count)."""

    def __init__(self, source: Callable[[], Any]) -> None:
        self._source = source

    def __contains__(self, value: object) -> bool:
        return value in self._source()

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._source()))


def add_pcdeq_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """TorchDEQ's ``add_deq_args`` plus pcDEQ: registered solvers accepted, ``--pc_*`` flags.

    Calls :func:`register` (idempotent), then ``torchdeq.add_deq_args(parser)``, then:

    * ``--f_solver``/``--b_solver`` accept every solver registered in TorchDEQ at parse
      time (TorchDEQ's own ``--b_solver`` only accepts its four built-ins), ``--core`` and
      ``--norm_type`` every registered core/norm, and ``--f_stop_mode``/``--b_stop_mode``
      only ``abs``/``rel`` (anything else fails late inside TorchDEQ);
    * ``--pc_norm_param``, ``--pc_eps``, ``--pc_activation``, ``--pc_beta``.

    Returns:
        ``parser``, for chaining.
    """
    torchdeq = _torchdeq()
    register()
    torchdeq.add_deq_args(parser)
    actions = {action.dest: action for action in parser._actions}
    live = {
        "f_solver": lambda: torchdeq.solver._solvers,
        "b_solver": lambda: torchdeq.solver._solvers,
        "core": lambda: torchdeq.core._core,
        "norm_type": lambda: ["none", *torchdeq.norm.base_norm._norm_class],
    }
    for dest, source in live.items():
        actions[dest].choices = _LiveChoices(source)
        actions[dest].help = f"{dest} (any registered name: %(choices)s)"
    for dest in ("f_stop_mode", "b_stop_mode"):
        actions[dest].choices = STOP_MODES

    def activations() -> list[str]:
        from .registry import list_activations

        return list_activations()

    group = parser.add_argument_group("pcDEQ (pcdeq-plugin)")
    group.add_argument(
        "--pc_norm_param",
        default="projection",
        choices=PARAMETRIZATIONS,
        help=PC_KEYS["pc_norm_param"],
    )
    group.add_argument("--pc_eps", type=float, default=1e-12, help=PC_KEYS["pc_eps"])
    group.add_argument(
        "--pc_activation",
        default="tanh",
        choices=_LiveChoices(activations),
        metavar="NAME",
        help=PC_KEYS["pc_activation"],
    )
    group.add_argument("--pc_beta", type=float, default=5.0, help=PC_KEYS["pc_beta"])
    return parser
