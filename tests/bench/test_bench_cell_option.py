"""``--cell``: any registered cell on a backbone model, through train and compare (issue 12)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pcdeq_plugin.bench.cli import main
from pcdeq_plugin.bench.parser import RUN_KEYS, build_parser, given


def test_cell_flag_is_the_cell_model_option_for_train_and_compare() -> None:
    parser = build_parser()
    for command in (["train", "--model", "single-conv"], ["compare", "--models", "linear"]):
        args = parser.parse_args([*command, "--cell", "deq", "--model-option", "width=4"])
        assert given(args, RUN_KEYS)["model_options"] == {"width": 4, "cell": "deq"}
        plain = parser.parse_args(command)
        assert "model_options" not in given(plain, RUN_KEYS)


def test_train_a_backbone_with_the_unconstrained_cell(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    argv = [
        "train", "--model", "single-conv", "--cell", "deq", "--model-option", "width=4",
        "--epochs", "1", "--train-limit", "64", "--test-limit", "32", "--batch-size", "32",
        "--device", "cpu", "--no-progress", "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["status"] == "ok"
    checkpoint = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    keys = list(checkpoint["model"])
    # the single-conv backbone, carrying the unconstrained cell (its recurrent conv has a bias)
    assert "block.layer.bias" in keys and "conv1.weight" in keys and "classifier.weight" in keys


def test_an_unknown_cell_is_a_usage_error(tmp_path: Path, capsys) -> None:
    argv = ["train", "--model", "linear", "--cell", "nope", "--epochs", "1", "--train-limit",
            "64", "--out", str(tmp_path / "run"), "--no-progress"]  # fmt: skip
    assert main(argv) == 2
    assert "unknown cell 'nope'; available: " in capsys.readouterr().err
