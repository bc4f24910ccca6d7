"""Issue 13, items 11 and 12: every bad value is refused before any work, with a message
that says what was wrong and what to do; nothing is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pcdeq_plugin.bench.cli import main

TINY = ["--plugin", "bench_tiny_models", "--model", "bench-tiny-deq", "--preset", "small",
        "--epochs", "1", "--train-limit", "64", "--test-limit", "16", "--device", "cpu",
        "--no-progress"]  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--lr", "inf"], "lr must be a finite number in (0, 1e+10), got inf"),
        (["--lr", "1e30"], "lr must be a finite number in (0, 1e+10), got 1e+30"),
        (["--lr", "nan"], "lr must be a finite number"),
        (["--weight-decay", "inf"], "weight_decay must be a finite number >= 0, got inf"),
        (["--gamma", "inf"], "gamma must be in (0, 1], got inf"),
        (["--seed", str(10**20)], "seed must be an integer from 0 to 2**32 - 1"),
        (["--seed", "-1"], "seed must be an integer from 0 to 2**32 - 1"),
        (["--train-limit", "1"], "leave no batch to train on"),
        (["--train-limit", "0"], "train_limit must be an integer >= 1 or None, got 0"),
        (["--model", "pcdeq-linear-1", "--batch-size", "1"],
         "batch_size 1: model 'pcdeq-linear-1' has BatchNorm layers"),
    ],
)  # fmt: skip
def test_bad_train_values_are_refused(
    tiny_plugin: str, tmp_path: Path, capsys, extra: list[str], message: str
) -> None:
    out = tmp_path / "run"
    assert main(["train", *TINY, *extra, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and message in err, err
    assert not (out / "config.json").exists() and not (out / "last.pt").exists()


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"epochs": True}, "epochs must be an integer >= 1, got True"),
        ({"batch_size": 32.0}, "batch_size must be an integer >= 1, got 32.0"),
        ({"lr": "0.1"}, "lr must be a finite number"),
        ({"seed": 1e20}, "seed must be an integer from 0 to 2**32 - 1"),
        ({"download": "yes"}, "download must be True or False, got 'yes'"),
        ({}, "holds an empty object"),
    ],
)
def test_bad_config_file_values_are_refused(
    tiny_plugin: str, tmp_path: Path, capsys, config: dict, message: str
) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    flags = [a for i, a in enumerate(TINY) if "--epochs" not in TINY[max(i - 1, 0) : i + 1]]
    assert main(["train", *flags, "--config", str(path), "--out", str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err


def test_an_empty_config_file_is_refused(tmp_path: Path, capsys) -> None:
    path = tmp_path / "config.json"
    path.write_text("\n")
    assert main(["train", "--config", str(path)]) == 2
    assert "the file is empty; it must hold a JSON object" in capsys.readouterr().err


@pytest.mark.parametrize("limit", ["-5", "0"])
def test_eval_refuses_a_test_limit_below_one(
    tiny_plugin: str, tmp_path: Path, capsys, limit
) -> None:
    out = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["eval", str(out / "last.pt"), "--test-limit", limit, *TINY[:2]]) == 2
    assert f"test_limit must be an integer >= 1 (images to score), got {limit}" in (
        capsys.readouterr().err
    )


def test_compare_refuses_bad_values_before_any_run(
    tiny_plugin: str, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "cmp"
    argv = ["compare", "--plugin", "bench_tiny_models", "--models", "bench-tiny-deq",
            "--seeds", "0", "--lr", "inf", "--out", str(out)]  # fmt: skip
    assert main(argv) == 2
    assert "lr must be a finite number" in capsys.readouterr().err
    assert not (out / "runs").exists()
