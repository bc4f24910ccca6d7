"""``add_pcdeq_args``: a TorchDEQ command line accepts pcDEQ whatever order it builds in."""

from __future__ import annotations

import argparse
import copy

import pytest
from torchdeq import add_deq_args, get_deq
from torchdeq_support import registered, torchdeq_registries  # noqa: F401

import pcdeq_plugin
from pcdeq_plugin.torchdeq_bridge import add_pcdeq_args, pcdeq_deq_kwargs, pcdeq_solver

PCDEQ_ARGV = ["--f_solver", "pcdeq", "--b_solver", "pcdeq", "--norm_type", "pc_nonneg"]


def test_add_pcdeq_args_accepts_registered_solvers() -> None:
    parser = add_pcdeq_args(argparse.ArgumentParser())
    args = parser.parse_args(
        ["--f_solver", "pcdeq", "--b_solver", "pcdeq", "--norm_type", "pc_nonneg", "--pc_beta", "2"]
    )
    assert (args.f_solver, args.b_solver, args.norm_type) == ("pcdeq", "pcdeq", "pc_nonneg")
    assert args.pc_beta == 2.0 and args.pc_norm_param == "projection"
    assert args.pc_activation == "tanh"
    deq = get_deq(pcdeq_deq_kwargs(args))
    assert deq.b_solver is pcdeq_solver
    # --pc_activation reads the activation registry at parse time
    assert parser.parse_args(["--pc_activation", "softsign"]).pc_activation == "softsign"


def test_add_pcdeq_args_sees_later_registrations() -> None:
    parser = add_pcdeq_args(argparse.ArgumentParser())
    pcdeq_plugin.register("pcdeq_late")
    assert parser.parse_args(["--b_solver", "pcdeq_late"]).b_solver == "pcdeq_late"


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--b_solver", "nope"], "invalid choice: 'nope'"),
        (["--f_stop_mode", "thompson"], "invalid choice: 'thompson'"),
        (["--pc_norm_param", "exp"], "invalid choice: 'exp'"),
        (["--pc_activation", "sigmoidd"], "invalid choice: 'sigmoidd'"),
    ],
)
def test_add_pcdeq_args_rejects_unknown_values(argv, needle, capsys) -> None:
    parser = add_pcdeq_args(argparse.ArgumentParser())
    with pytest.raises(SystemExit) as info:
        parser.parse_args(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert needle in err
    if argv[0] == "--b_solver":
        assert "'pcdeq'" in err and "'anderson'" in err  # the choices are listed
    if argv[0] == "--pc_activation":
        assert "'sigmoid'" in err and "'tanh'" in err


# -- issue 10, items 1 and 2 ------------------------------------------------------------------------


def _deq_first() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_deq_args(parser)
    add_pcdeq_args(parser)
    return parser


def _pcdeq_first() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_pcdeq_args(parser)
    add_deq_args(parser)
    return parser


def _register_then_parser_then_both() -> argparse.ArgumentParser:
    pcdeq_plugin.register("pcdeq")
    parser = argparse.ArgumentParser()
    parser.add_argument("--lr", type=float, default=0.1)
    add_deq_args(parser)
    parser.add_argument("--epochs", type=int, default=3)
    add_pcdeq_args(parser)
    return parser


ORDERS = {
    "deq_first": _deq_first,
    "pcdeq_first": _pcdeq_first,
    "mixed": _register_then_parser_then_both,
}


@pytest.mark.parametrize("order", sorted(ORDERS))
def test_both_helpers_on_one_parser_in_any_order(order) -> None:
    parser = ORDERS[order]()
    args = parser.parse_args([*PCDEQ_ARGV, "--f_max_iter", "7", "--ift"])
    assert (args.f_solver, args.b_solver, args.norm_type) == ("pcdeq", "pcdeq", "pc_nonneg")
    assert args.f_max_iter == 7 and args.ift is True and args.pc_norm_missing == "warn"
    deq = get_deq(pcdeq_deq_kwargs(args))
    assert deq.f_solver is pcdeq_solver and deq.b_solver is pcdeq_solver
    # every option exists exactly once
    strings = [s for action in parser._actions for s in action.option_strings]
    assert len(strings) == len(set(strings))
    defaults = parser.parse_args([])
    assert defaults.b_solver == "fixed_point_iter" and defaults.indexing == []


@pytest.mark.parametrize("order", sorted(ORDERS))
def test_unknown_backward_solver_still_fails_listing_choices(order, capsys) -> None:
    parser = ORDERS[order]()
    with pytest.raises(SystemExit):
        parser.parse_args(["--b_solver", "pcdeqq"])
    err = capsys.readouterr().err
    assert "invalid choice: 'pcdeqq'" in err and "'pcdeq'" in err


def test_calling_it_twice_is_harmless() -> None:
    parser = _deq_first()
    add_pcdeq_args(parser)
    assert parser.parse_args(["--b_solver", "pcdeq", "--pc_beta", "3"]).pc_beta == 3.0


def test_a_genuinely_different_redeclaration_still_conflicts() -> None:
    parser = add_pcdeq_args(argparse.ArgumentParser())
    with pytest.raises(argparse.ArgumentError, match="conflicting option string"):
        parser.add_argument("--f_max_iter", type=int, default=999)
    parser.add_argument("--my_flag", action="store_true")  # ordinary options are untouched
    assert parser.parse_args(["--my_flag"]).my_flag is True


def test_a_copied_parser_keeps_working() -> None:
    parser = copy.deepcopy(_pcdeq_first())
    add_deq_args(parser)  # absorbed by the copy itself
    assert parser.parse_args(["--b_solver", "pcdeq"]).b_solver == "pcdeq"


@pytest.mark.usefixtures("registered")
def test_plain_add_deq_args_still_rejects_pcdeq() -> None:
    """TorchDEQ's literal choices: registration alone cannot reach them (hence the one call)."""
    parser = argparse.ArgumentParser()
    add_deq_args(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--b_solver", "pcdeq"])
