"""The one argument-checking module: the same mistake reads the same in every layer.

A bool where a count is expected (``True`` is an ``int`` in Python) is refused by the
core, the TorchDEQ bridge, the harness and the baselines alike, with one message:
``<name> must be an integer >= <n>, got True``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import pytest
import torch

import pcdeq_plugin as P
from pcdeq_plugin import checks
from pcdeq_plugin.bench.config import ConfigError, TrainConfig
from pcdeq_plugin.cells import PcDEQLinear
from pcdeq_plugin.certificates import certify

MNIST = (1, 28, 28)


def _bridge_config() -> None:
    pytest.importorskip("torchdeq")
    from pcdeq_plugin.torchdeq_bridge import pcdeq_deq_kwargs

    pcdeq_deq_kwargs(f_max_iter=True)


def _certify_steps() -> None:
    block = PcDEQLinear(3)
    certify(block, torch.rand(2, 3), steps=True)


# (where, the argument's name in the message, the least valid count, the call)
BOOL_AS_COUNT: list[tuple[str, str, int, Callable[[], object]]] = [
    ("SolverConfig", "max_iter", 1, lambda: P.SolverConfig(max_iter=True)),
    ("SolverConfig.replace", "check_every", 1, lambda: P.SolverConfig().replace(check_every=True)),
    ("PcDEQLinear", "features", 1, lambda: PcDEQLinear(True)),
    (
        "build_model width",
        "width",
        1,
        lambda: P.build_model("pcdeq-linear-1", MNIST, 10, width=True),
    ),
    (
        "build_model max_iter",
        "max_iter",
        1,
        lambda: P.build_model("pcdeq-linear-1", MNIST, 10, max_iter=True),
    ),
    ("anderson memory", "memory", 1, lambda: P.get_solver("anderson", memory=True)),
    ("certify steps", "steps", 2, _certify_steps),
    ("harness epochs", "epochs", 1, lambda: TrainConfig(epochs=True).validate()),
    ("harness workers", "workers", 0, lambda: TrainConfig(workers=True).validate()),
    ("bridge f_max_iter", "f_max_iter", 1, _bridge_config),
    (
        "baseline mondeq-fc width",
        "width",
        1,
        lambda: P.build_model("mondeq-fc", MNIST, 10, width=True),
    ),
    (
        "baseline node max_num_steps",
        "max_num_steps",
        1,
        lambda: P.build_model("node", MNIST, 10, max_num_steps=True),
    ),
]


@pytest.mark.parametrize(
    ("label", "minimum", "call"),
    [case[1:] for case in BOOL_AS_COUNT],
    ids=[case[0] for case in BOOL_AS_COUNT],
)
def test_a_bool_where_a_count_is_expected_is_refused_everywhere_with_one_message(
    label: str, minimum: int, call: Callable[[], object]
) -> None:
    with pytest.raises(ValueError) as info:
        call()
    # an optional "owner: " prefix (the solver or model), then the one format
    pattern = rf"(\S+: )?{label} must be an integer >= {minimum}, got True"
    assert re.fullmatch(pattern, str(info.value)), str(info.value)


def test_an_argument_error_is_both_a_type_error_and_a_value_error() -> None:
    # code written against either exception class (as this project's was) keeps working
    for kind in (TypeError, ValueError):
        with pytest.raises(kind):
            checks.check_count("n", "3")


@pytest.mark.parametrize("value", [True, 0, -1, 2.0, "3", None])
def test_check_count_refuses_what_is_not_a_count(value: object) -> None:
    with pytest.raises(
        checks.ArgumentError, match=rf"^n must be an integer >= 1, got {re.escape(repr(value))}$"
    ):
        checks.check_count("n", value)


def test_check_count_bounds_context_none_and_error_class() -> None:
    assert checks.check_count("n", 0, 0) == 0
    assert checks.check_count("n", None, allow_none=True) is None
    with pytest.raises(
        checks.ArgumentError, match=r"^m must be an integer >= 3 for 'anderson', got 2$"
    ):
        checks.check_count("m", 2, 3, context=" for 'anderson'")
    with pytest.raises(ConfigError, match=r"^k must be an integer >= 1 or None, got 0$"):
        checks.check_count("k", 0, allow_none=True, error=ConfigError)


@pytest.mark.parametrize("value", [True, 0, -1e-3, math.nan, math.inf, "1e-3"])
def test_check_positive_refuses_bools_nan_inf_and_non_positives(value: object) -> None:
    with pytest.raises(checks.ArgumentError, match="^tol must be a positive finite number, got "):
        checks.check_positive("tol", value)
    assert checks.check_positive("tol", 3) == 3.0


@pytest.mark.parametrize("value", [1, 0, "False", "true", None])
def test_check_flag_wants_a_real_bool(value: object) -> None:
    with pytest.raises(
        checks.ArgumentError, match=rf"^f must be True or False, got {re.escape(repr(value))} "
    ):
        checks.check_flag("f", value)
    assert checks.check_flag("f", False) is False
    assert checks.check_flag("f", None, allow_none=True) is None


def test_check_choice_compares_types_too() -> None:
    assert checks.check_choice("mode", "abs", ("abs", "rel")) == "abs"
    with pytest.raises(checks.ArgumentError, match=r"^unknown mode 'max'; available: abs, rel$"):
        checks.check_choice("mode", "max", ("abs", "rel"))
    # True == 1, but True is no variant
    with pytest.raises(checks.ArgumentError, match="^unknown variant True; available: 1, 2$"):
        checks.check_choice("variant", True, (1, 2))


def test_check_known_keys_names_the_owner_and_lists_the_valid_keys() -> None:
    checks.check_known_keys({"a": 1}, ("a", "b"))
    with pytest.raises(
        checks.ArgumentError, match=r"^net: unknown option\(s\) \['c', 'd'\]; valid options: a, b$"
    ):
        checks.check_known_keys({"d": 1, "c": 2, "a": 3}, ("a", "b"), owner="net")


def test_pcdeq_variant_refuses_a_bool() -> None:
    # True == 1 would have silently built a pcDEQ-1 block
    with pytest.raises(ValueError, match="unknown pcDEQ variant True; choose 1 or 2"):
        PcDEQLinear(3, variant=True)


def test_anderson_beta_refuses_a_bool() -> None:
    with pytest.raises(ValueError, match=r"anderson: beta must be in \(0, 1\], got True"):
        P.get_solver("anderson", beta=True)
