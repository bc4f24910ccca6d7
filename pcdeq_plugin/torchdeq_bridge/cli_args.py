"""``add_pcdeq_args``: the one parser call a TorchDEQ command line needs for pcDEQ.

TorchDEQ 0.1.0's ``add_deq_args`` gives ``--b_solver`` a literal ``choices=[...]`` of its
four built-in solvers, built anew inside the user's parser at each call, so no
registration can reach it: ``--b_solver pcdeq`` fails at parse time. A codebase adds one
line, ``add_pcdeq_args(parser)``, before or after its own ``add_deq_args(parser)``:

* options ``add_deq_args`` already added are adapted in place (``--f_solver`` and
  ``--b_solver`` accept every solver registered at parse time, ``--core`` and
  ``--norm_type`` every core and norm, the stop modes only ``abs``/``rel``);
* options still missing are added, and a later ``add_deq_args(parser)`` re-declaring one
  of them identically is absorbed instead of failing with "conflicting option string";
* the ``--pc_*`` flags are added once (calling it twice is harmless).
"""

from __future__ import annotations

import argparse
import types
from collections.abc import Callable, Iterator
from typing import Any

from ..checks import check_positive
from ._common import STOP_MODES, import_torchdeq
from .config import PC_KEYS
from .norm import PARAMETRIZATIONS
from .norm_targets import MISSING_POLICIES
from .registration import register

__all__ = ["add_pcdeq_args"]

# set on the actions that mirror TorchDEQ's own declaration: a later identical one is absorbed
_TORCHDEQ_OPTION = "_pcdeq_mirrors_torchdeq"
_ABSORBING = "_pcdeq_absorbs_torchdeq_options"


class _LiveChoices:
    """argparse ``choices`` that read a registry at parse time (so later registrations count)."""

    def __init__(self, source: Callable[[], Any]) -> None:
        self._source = source

    def __contains__(self, value: object) -> bool:
        return value in self._source()

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._source()))


def _torchdeq_actions(torchdeq: Any) -> list[argparse.Action]:
    scratch = argparse.ArgumentParser(add_help=False)
    torchdeq.add_deq_args(scratch)
    return list(scratch._actions)


def _add_missing_deq_args(parser: Any, torchdeq: Any) -> None:
    present = parser._option_string_actions
    for action in _torchdeq_actions(torchdeq):
        existing = [present[o] for o in action.option_strings if o in present]
        if not existing:
            setattr(action, _TORCHDEQ_OPTION, True)
            parser._add_action(action)
        elif existing[0].dest == action.dest and existing[0].default == action.default:
            setattr(existing[0], _TORCHDEQ_OPTION, True)  # add_deq_args put it there


def _relax_choices(parser: Any, torchdeq: Any) -> None:
    live = {
        "f_solver": lambda: torchdeq.solver._solvers,
        "b_solver": lambda: torchdeq.solver._solvers,
        "core": lambda: torchdeq.core._core,
        "norm_type": lambda: ["none", *torchdeq.norm.base_norm._norm_class],
    }
    present = parser._option_string_actions
    for dest, source in live.items():
        action = present.get("--" + dest)
        if action is not None and action.dest == dest:
            action.choices = _LiveChoices(source)
            action.help = f"{dest} (any registered name: %(choices)s)"
    for dest in ("f_stop_mode", "b_stop_mode"):
        action = present.get("--" + dest)
        if action is not None and action.dest == dest:
            action.choices = STOP_MODES


def _absorbing_add_argument(self: Any, *args: Any, **kwargs: Any) -> argparse.Action:
    """``add_argument`` that returns the existing action for an identical TorchDEQ option."""
    present = self._option_string_actions
    if args and all(isinstance(a, str) and a[:1] in self.prefix_chars for a in args):
        found = {id(present.get(a)): present.get(a) for a in args}
        action = next(iter(found.values())) if len(found) == 1 else None
        if (
            action is not None
            and getattr(action, _TORCHDEQ_OPTION, False)
            and kwargs.get("dest", action.dest) == action.dest
            and kwargs.get("default", action.default) == action.default
        ):
            return action
    return type(self).add_argument(self, *args, **kwargs)


def _absorb_later_deq_args(parser: Any) -> None:
    if getattr(parser, _ABSORBING, False):
        return
    # bound to this parser, so a deep copy of the parser gets its own
    parser.add_argument = types.MethodType(_absorbing_add_argument, parser)
    setattr(parser, _ABSORBING, True)


def _positive_float(text: str) -> float:
    """An argparse ``type``: the value must be a positive finite number (``nan`` is not)."""
    try:
        return check_positive("the value", float(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{error} ({text!r})") from None


def _add_pc_args(parser: Any) -> None:
    def activations() -> list[str]:
        from ..registry import list_activations

        return list_activations()

    flags: dict[str, dict[str, Any]] = {
        "--pc_norm_param": {"default": "projection", "choices": PARAMETRIZATIONS},
        "--pc_eps": {"type": _positive_float, "default": 1e-12},
        "--pc_norm_missing": {"default": "warn", "choices": MISSING_POLICIES},
        "--pc_activation": {
            "default": "tanh",
            "choices": _LiveChoices(activations),
            "metavar": "NAME",
        },
        "--pc_beta": {"type": _positive_float, "default": 5.0},
    }
    missing = {
        flag: spec for flag, spec in flags.items() if flag not in parser._option_string_actions
    }
    if not missing:
        return
    group = (
        parser.add_argument_group("pcDEQ (pcdeq-plugin)")
        if isinstance(parser, argparse.ArgumentParser)
        else parser
    )
    for flag, spec in missing.items():
        group.add_argument(flag, help=PC_KEYS[flag[2:]], **spec)


def add_pcdeq_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make an argparse parser accept pcDEQ: TorchDEQ's options, relaxed, plus ``--pc_*``.

    Works whatever the order: before or after the codebase's own
    ``torchdeq.add_deq_args(parser)``, before or after :func:`register` (it calls it,
    idempotently), once or twice. After it, ``--f_solver pcdeq --b_solver pcdeq
    --norm_type pc_nonneg`` parse; ``--f_solver``/``--b_solver``/``--core``/``--norm_type``
    accept any name registered in TorchDEQ at parse time and list them on a typo;
    ``--f_stop_mode``/``--b_stop_mode`` accept only ``abs``/``rel`` (anything else fails
    late inside TorchDEQ). Added flags: ``--pc_norm_param``, ``--pc_eps``,
    ``--pc_norm_missing``, ``--pc_activation``, ``--pc_beta``.

    Args:
        parser: The codebase's parser (``add_deq_args`` may or may not have run on it).

    Returns:
        ``parser``, for chaining.

    Raises:
        ImportError: TorchDEQ is not importable.
    """
    torchdeq = import_torchdeq()
    register()
    _add_missing_deq_args(parser, torchdeq)
    _relax_choices(parser, torchdeq)
    _absorb_later_deq_args(parser)
    _add_pc_args(parser)
    return parser
