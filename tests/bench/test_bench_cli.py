"""The pcdeq-bench command line, called in-process through ``main(argv)``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pcdeq_plugin.bench.cli import main
from pcdeq_plugin.bench.parser import build_parser


def test_list_shows_every_registry_and_the_plugins(tiny_plugin: str, capsys) -> None:
    assert main(["list", "--plugin", tiny_plugin]) == 0
    text = capsys.readouterr().out
    for section in ("models:", "activations:", "solvers:", "datasets:", "plugins:"):
        assert section in text
    assert "bench-tiny-deq [tiny; presets: small]" in text
    assert "mnist5k [1x28x28, 10 classes]" in text and "cifar10-aug" in text
    # the harness's datasets come through the entry-point door, like the baselines
    assert "pcdeq_plugin.bench.datasets (pcdeq-plugin): loaded [entry point]" in text
    assert main(["list", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {"models", "activations", "solvers", "datasets", "plugins"} <= set(data)
    assert "fixed_point" in data["solvers"] and "tanh" in data["activations"]
    assert all({"name", "status", "errors"} <= set(p) for p in data["plugins"])


def _train_args(tiny_plugin: str, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--plugin", tiny_plugin, "--model", "bench-tiny-deq", "--preset", "small",
        "--epochs", "1", "--train-limit", "64", "--test-limit", "32", "--batch-size", "32",
        "--device", "cpu", "--no-progress", "--out", str(out), *extra,
    ]  # fmt: skip


def test_train_eval_report_round_trip(tiny_plugin: str, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(_train_args(tiny_plugin, out, "--model-option", "width=6")) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["status"] == "ok" and summary["params"] == 784 * 6 + 6 + 36 + 6 * 10 + 10
    assert main(["train", "--out", str(out), "--resume", "--epochs", "2", "--no-progress"]) == 0
    resumed = json.loads(capsys.readouterr().out)
    assert resumed["epochs_completed"] == 2
    assert main(["eval", str(out / "best.pt"), "--test-limit", "50", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 50 and result["trained_epochs"] == resumed["best_epoch"]
    # the same 32 test images in the same batches: exactly the accuracy training recorded
    argv = ["eval", str(out / "best.pt"), "--test-limit", "32", "--batch-size", "32"]
    assert main([*argv, "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["test_acc"] == resumed["best_test_acc"]
    assert main(["report", str(out), "--no-plots"]) == 0
    assert "| bench-tiny-deq | tiny | small |" in capsys.readouterr().out


def test_train_from_a_json_config_file(tiny_plugin: str, tmp_path: Path, capsys) -> None:
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"model": "bench-tiny-deq", "plugins": [tiny_plugin], "epochs": 1,
                                  "train_limit": 32, "test_limit": 16, "progress": False}))  # fmt: skip
    assert (
        main(["train", "--config", str(config), "--batch-size", "16", "--out", str(tmp_path / "r")])
        == 0
    )
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["batch_size"] == 16 and saved["train_limit"] == 32


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--model", "nope", "--no-progress"], "unknown model 'nope'; available:"),
        (["train", "--dataset", "nope"], "unknown dataset 'nope'; available:"),
        (["train", "--dataset", "svhn", "--data-dir", "{tmp}/none"], "--download"),
        (["eval", "{tmp}/missing.pt"], "does not exist"),
        (["report", "{tmp}"], "no summary.json"),
        (["train", "--config", "{tmp}/absent.json"], "cannot read --config"),
        (
            ["train", "--model", "pcdeq-linear-1", "--preset", "nope"],
            "no preset 'nope'; available:",
        ),
        (
            ["compare", "--models", "pcdeq-linear-1", "--preset", "bogus", "--out", "{tmp}/c"],
            "has a preset 'bogus'; their presets: mnist, small",
        ),
        (["compare", "--dataset", "nope", "--out", "{tmp}/c"], "unknown dataset 'nope'"),
        (["compare", "--reference", "node-x", "--out", "{tmp}/c"], "available: pcdeq-linear-1"),
        (["compare", "--jobs", "2", "--in-process", "--out", "{tmp}/c"], "drop --in-process"),
        (["report", "{tmp}/absent"], "does not exist"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(
    tmp_path: Path, capsys, argv: list[str], message: str
) -> None:
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "error:" in err


def test_corrupt_checkpoint_via_cli(tiny_plugin: str, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(_train_args(tiny_plugin, out)) == 0
    (out / "last.pt").write_bytes(b"garbage")
    assert main(["train", "--out", str(out), "--resume"]) == 2
    assert "corrupt" in capsys.readouterr().err
    assert (out / "last.pt").read_bytes() == b"garbage"
    assert main(["eval", str(out / "last.pt")]) == 2


def test_version(capsys) -> None:
    from pcdeq_plugin import __version__

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"pcdeq-bench {__version__}"


def test_parser_rejects_bad_choices(capsys) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--amp", "fp8"])
    assert "invalid choice: 'fp8'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--model-option", "width"])


def test_list_names_a_broken_plugin_and_its_error(
    tmp_path: Path, monkeypatch, capsys, clean_plugins: None
) -> None:
    (tmp_path / "bench_broken_plugin.py").write_text(
        "from pcdeq_plugin import hookimpl\n\n"
        "@hookimpl\n"
        "def pcdeq_register_models():\n"
        "    raise RuntimeError('cannot build my models')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.warns(UserWarning, match="cannot build my models"):
        assert main(["list", "--plugin", "bench_broken_plugin"]) == 0
    text = capsys.readouterr().out
    assert "bench_broken_plugin: failed" in text
    assert "error: pcdeq_register_models() raised RuntimeError: cannot build my models" in text


def test_report_reference_and_a_broken_plan(tiny_plugin: str, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(_train_args(tiny_plugin, out)) == 0
    capsys.readouterr()
    assert main(["report", str(out), "--no-plots", "--reference", "bench-tiny-deq"]) == 0
    assert "| 1/1 | 1.00x | 1.00x |" in capsys.readouterr().out
    assert main(["report", str(out), "--no-plots", "--reference", "nope"]) == 2
    assert "reference model 'nope' is not in this comparison" in capsys.readouterr().err
    (out / "compare_plan.json").write_text("{")
    assert main(["report", str(out), "--no-plots"]) == 2
    assert "compare_plan.json is unreadable" in capsys.readouterr().err


def test_help_texts_name_the_defaults(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for phrase in ("--jobs", "--reference", "default 3", "default 0,1,2", "default small",
                   "pcDEQ-1, pcDEQ-2, monDEQ, NODE, ANODE"):  # fmt: skip
        assert phrase in text, phrase


def test_compare_resume_needs_only_out(tiny_plugin: str, tmp_path: Path, capsys) -> None:
    """The resume hint printed on Ctrl-C is `compare --out X --resume`: what is not given
    comes from the comparison in X (models, seeds, options)."""
    out = tmp_path / "cmp"
    first = ["compare", "--in-process", "--no-plots", "--plugin", tiny_plugin, "--models",
             "bench-tiny-deq", "--seeds", "3", "--epochs", "1", "--train-limit", "64",
             "--test-limit", "32", "--batch-size", "32", "--device", "cpu", "--out", str(out)]  # fmt: skip
    assert main(first) == 0
    capsys.readouterr()
    again = ["compare", "--in-process", "--no-plots", "--out", str(out), "--resume"]
    assert main([*again, "--epochs", "2"]) == 0
    (row,) = json.loads((out / "compare.json").read_text())["rows"]
    assert row["seeds"] == [3] and row["epochs"] == 2 and row["model"] == "bench-tiny-deq"
    config = json.loads((out / "runs" / "bench-tiny-deq" / "seed3" / "config.json").read_text())
    assert config["train_limit"] == 64 and config["batch_size"] == 32
    assert main([*again, "--lr", "0.5"]) == 2
    assert "lr: default there, 0.5 given" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--model", "x"], "interrupted by SIGINT (no --out, so nothing was saved)"),
        (["train", "--out", "R"], "interrupted by SIGINT, checkpoint and metrics so far kept; "
         "continue with: pcdeq-bench train --out R --resume"),
        (["compare", "--out", "C"], "table so far in C/compare.md; continue with: "
         "pcdeq-bench compare --out C --resume"),
        (["report", "C"], "pcdeq-bench report: interrupted by SIGINT\n"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_ctrl_c_and_sigterm_messages(
    monkeypatch, capsys, argv: list[str], message: str, signal_name: str
) -> None:
    from pcdeq_plugin.bench import cli
    from pcdeq_plugin.bench.runtime import RunInterrupted

    def interrupted(args) -> int:
        raise KeyboardInterrupt if signal_name == "SIGINT" else RunInterrupted(signal_name)

    for name in ("_cmd_train", "_cmd_compare", "_cmd_report"):
        monkeypatch.setattr(cli, name, interrupted)
    assert main(argv) == {"SIGINT": 130, "SIGTERM": 143}[signal_name]
    expected = message.replace("SIGINT", signal_name).replace("/", os.sep)
    assert expected in capsys.readouterr().err
