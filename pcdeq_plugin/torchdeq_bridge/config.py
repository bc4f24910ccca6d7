"""Configuration helpers: a validated copy of the config, defaults, and argparse flags."""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Mapping
from typing import Any

from ..checks import check_choice, check_count, check_positive
from ._common import DEFAULT_SOLVER_NAME, STOP_MODES, import_torchdeq
from .norm import PARAMETRIZATIONS
from .norm_targets import MISSING_POLICIES

__all__ = ["PC_KEYS", "pcdeq_defaults", "pcdeq_deq_kwargs"]

# Our own config keys (TorchDEQ's namespace is flat; ours all start with ``pc_``).
PC_KEYS: dict[str, str] = {
    "pc_norm_param": "parametrization of pc_nonneg: " + " | ".join(PARAMETRIZATIONS),
    "pc_eps": "lower guard of the row norm in the 'projection' parametrization",
    "pc_norm_missing": "when apply_norm with pc_nonneg constrains nothing or skips a custom "
    "layer's weights: " + " | ".join(MISSING_POLICIES),
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


def _deq_keys() -> set[str]:
    """Every key TorchDEQ 0.1.0's ``add_deq_args`` defines (they cover all keys it reads)."""
    parser = argparse.ArgumentParser(add_help=False)
    import_torchdeq().add_deq_args(parser)
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
    torchdeq = import_torchdeq()
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
    _check_numbers(config)
    if "pc_norm_missing" in config:
        check_choice("pc_norm_missing", config["pc_norm_missing"], MISSING_POLICIES)
    for key in ("f_stop_mode", "b_stop_mode"):
        if key in config:
            check_choice(key, config[key], STOP_MODES)
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


def _check_numbers(config: dict[str, Any]) -> None:
    """Tolerances and iteration caps TorchDEQ would accept and then misuse silently."""
    for key in ("f_tol", "b_tol"):
        if key in config:
            check_positive(key, config[key])
    for key, least in (("f_max_iter", 1), ("b_max_iter", 1), ("eval_f_max_iter", 0)):
        if key in config:
            check_count(key, config[key], least)
