"""compare and report: tables with mean +- std, failures and unregistered models, plots."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pytest

from pcdeq_plugin import UnknownNameError
from pcdeq_plugin.bench import compare, write_report
from pcdeq_plugin.bench.config import ConfigError
from pcdeq_plugin.bench.datasets import DatasetNotFoundError
from pcdeq_plugin.bench.plots import write_plots
from pcdeq_plugin.bench.table import add_ratios, aggregate, pick_reference, render_markdown

SMALL = {"train_limit": 64, "test_limit": 32, "batch_size": 32, "device": "cpu"}


def _png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_in_process_reports_ok_failed_and_unregistered(
    tmp_path: Path, tiny_plugin: str
) -> None:
    out = tmp_path / "cmp"
    report = compare(
        ["bench-tiny-deq", "bench-crash", "no-such-model"],
        [0, 1],
        out_dir=out,
        isolate=False,
        log=None,
        plugins=[tiny_plugin],
        **SMALL,
    )
    rows = {row["model"]: row for row in report["rows"]}
    tiny = rows["bench-tiny-deq"]
    assert tiny["status"] == "ok" and tiny["ok"] == 2 and tiny["seeds"] == [0, 1]
    accuracies = [r["test_acc"] for r in report["runs"] if r["model"] == "bench-tiny-deq"]
    assert len(accuracies) == 2
    assert tiny["test_acc_mean"] == pytest.approx(statistics.fmean(accuracies), rel=1e-12)
    assert tiny["test_acc_std"] == pytest.approx(statistics.stdev(accuracies), rel=1e-12)
    assert (
        tiny["params"] > 0
        and tiny["fwd_iters"] > 1
        and tiny["unit"] == "iter"
        and tiny["preset"] == "small"
    )
    assert (
        rows["bench-crash"]["status"] == "failed" and "always fails" in rows["bench-crash"]["error"]
    )
    assert rows["no-such-model"]["status"] == "not registered"
    markdown = (out / "compare.md").read_text()
    assert "| bench-tiny-deq | tiny | small |" in markdown and "not registered" in markdown
    assert "always fails" in markdown
    saved = json.loads((out / "compare.json").read_text())
    assert [r["model"] for r in saved["rows"]] == ["bench-tiny-deq", "bench-crash", "no-such-model"]
    for name in ("accuracy_per_epoch.png", "iterations_per_epoch.png", "accuracy_vs_params.png"):
        assert _png(out / name), name
    # the report re-renders the same table from the files alone
    (out / "compare.md").unlink()
    again = write_report(out, plots=False)
    assert again["markdown"] == markdown
    # a second compare into the same directory refuses instead of overwriting
    with pytest.raises(ConfigError, match="already holds a comparison"):
        compare(["bench-tiny-deq"], [0], out_dir=out, isolate=False, log=None, **SMALL)
    # --resume reuses finished runs
    resumed = compare(
        ["bench-tiny-deq"],
        [0, 1],
        out_dir=out,
        isolate=False,
        resume=True,
        log=None,
        plots=False,
        **SMALL,
    )
    assert resumed["rows"][0]["test_acc_mean"] == tiny["test_acc_mean"]
    # a failed seed is retried on resume; the failed attempt is kept aside, not counted
    retried = compare(
        ["bench-crash"],
        [0, 1],
        out_dir=out,
        isolate=False,
        resume=True,
        log=None,
        plots=False,
        **SMALL,
    )
    assert retried["rows"][0]["status"] == "failed" and retried["rows"][0]["runs"] == 2
    kept = sorted(
        p.name.split(".")[0] for p in (out / "runs" / "bench-crash").glob("seed*.failed-*")
    )
    assert kept == ["seed0", "seed1"]


def test_compare_rejects_options_it_sets_itself(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="compare sets seed itself"):
        compare(["x"], [0], out_dir=tmp_path, seed=3, log=None)
    with pytest.raises(ConfigError, match="unknown config key"):
        compare(["x"], [0], out_dir=tmp_path, wibble=3, log=None)


def test_aggregate_mean_std_and_markdown() -> None:
    runs = [
        {"model": "m", "status": "ok", "seed": s, "test_acc": acc, "params": 10, "fwd_iters": it,
         "bwd_iters": None, "unit": "nfe", "seconds_per_epoch": 2.0, "peak_mem_mb": mem,
         "peak_mem_kind": "cpu_rss_high_water", "failed_solves": 1, "family": "node", "preset": "small"}
        for s, acc, it, mem in ((0, 0.5, 10.0, 100.0), (1, 0.7, 20.0, 300.0))
    ]  # fmt: skip
    (row,) = aggregate(runs)
    assert row["test_acc_mean"] == pytest.approx(0.6)
    assert row["test_acc_std"] == pytest.approx(0.1414213, rel=1e-5)  # sample std
    assert row["fwd_iters"] == 15.0 and row["peak_mem_mb"] == 300.0 and row["failed_solves"] == 2
    text = render_markdown([row])
    assert "| m | node | small | 60.00 ± 14.14 | 10 | 15.0 nfe | - | 2.0 | 300 | 2 | 2/2 |" in text


def test_report_on_an_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no summary.json"):
        write_report(tmp_path)


def _summary(model: str, family: str, seed: int, seconds: list[float], fwd: float) -> dict:
    history = [{"epoch": e + 1, "train_seconds": s, "test_acc": 0.5, "fwd_iters": fwd}
               for e, s in enumerate(seconds)]  # fmt: skip
    return {"model": model, "family": family, "status": "ok", "seed": seed, "test_acc": 0.5,
            "params": 100, "fwd_iters": fwd, "bwd_iters": fwd, "unit": "iter",
            "seconds_per_epoch": sum(seconds) / len(seconds), "history": history}  # fmt: skip


def test_median_seconds_and_ratios_to_a_reference() -> None:
    runs = [
        _summary("deq", "deq", 0, [2.0, 2.0, 50.0], 12.0),  # one epoch slowed by a neighbour
        _summary("deq", "deq", 1, [2.0, 2.0, 2.0], 12.0),
        _summary("pc", "pcdeq", 0, [1.0, 1.0, 1.0], 4.0),
    ]
    rows = aggregate(runs, {"models": ["deq", "pc"]})
    deq = rows[0]
    assert deq["seconds_per_epoch_median"] == 2.0 and deq["seconds_per_epoch"] > 9
    # the default reference is the first pcDEQ model, not the first row
    assert pick_reference(rows) == "pc" and pick_reference(rows, "deq") == "deq"
    with pytest.raises(ValueError, match="'nope' is not in this comparison; available: deq, pc"):
        pick_reference(rows, "nope")
    add_ratios(rows, "pc")
    assert deq["time_ratio"] == 2.0 and deq["fwd_ratio"] == 3.0
    assert rows[1]["time_ratio"] == rows[1]["fwd_ratio"] == 1.0
    text = render_markdown(rows, {"dataset": "d", "epochs": 3, "seeds": [0, 1], "reference": "pc"})
    assert "| 2.0 | - | 0 | 2/2 | 2.00x | 3.00x |" in text and "| 1.00x | 1.00x |" in text
    assert "by those of `pc` (1.00x)" in text and "median over every epoch" in text
    add_ratios(rows, None)  # no reference (nothing finished): ratios are blank, not errors
    assert deq["time_ratio"] is None and "| - | - |" in render_markdown(rows)


def test_report_reads_only_its_own_runs(tmp_path: Path) -> None:
    def put(path: Path, data: dict) -> None:
        path.mkdir(parents=True, exist_ok=True)
        (path / "summary.json").write_text(json.dumps(data))

    put(tmp_path / "lin1", _summary("pc", "pcdeq", 0, [1.0], 4.0))
    put(tmp_path / "tool", {"accuracy": 0.9})  # some other program's summary.json
    nested = tmp_path / "old_compare"
    nested.mkdir()
    (nested / "compare_plan.json").write_text(json.dumps({"models": ["deq"], "seeds": [0]}))
    put(nested / "runs" / "deq" / "seed0", _summary("deq", "deq", 0, [2.0], 9.0))
    put(nested / "stray", _summary("stray", "deq", 0, [2.0], 9.0))  # not under runs/
    report = write_report(tmp_path, plots=False)
    assert [row["model"] for row in report["rows"]] == ["pc"]
    assert [row["model"] for row in write_report(nested, plots=False)["rows"]] == ["deq"]
    with pytest.raises(ValueError, match="reference model 'x'"):
        write_report(nested, plots=False, reference="x")
    (nested / "compare_plan.json").write_text("{not json")
    with pytest.raises(ValueError, match="compare_plan.json is unreadable"):
        write_report(nested, plots=False)


def test_plots_with_one_epoch_and_with_several(tmp_path: Path) -> None:
    for epochs in (1, 4):
        runs = [_summary("pc", "pcdeq", s, [1.0] * epochs, 4.0 + s) for s in (0, 1)]
        runs.append(_summary("deq", "deq", 0, [1.0] * epochs, 4.0))
        runs[-1]["params"] = 100  # same size as pc: drawn side by side, not on top
        rows = aggregate(runs)
        out = tmp_path / str(epochs)
        out.mkdir()
        written = write_plots(out, runs, rows)
        assert [p.name for p in written] == [
            "accuracy_per_epoch.png", "iterations_per_epoch.png", "accuracy_vs_params.png",
            "accuracy_vs_time.png",
        ]  # fmt: skip
        assert all(_png(p) for p in written)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"dataset": "nope"}, UnknownNameError, "unknown dataset 'nope'; available:"),
        ({"preset": "bogus"}, ConfigError, "has a preset 'bogus'; their presets: small"),
        ({"jobs": 2, "isolate": False}, ConfigError, "drop --in-process"),
        ({"jobs": 0}, ConfigError, "jobs must be an integer >= 1"),
        (
            {"reference": "x"},
            ConfigError,
            "'x' is not in this comparison; available: bench-tiny-deq",
        ),
        ({"seeds": [0, 0]}, ConfigError, "seed(s) 0 listed twice"),
        ({"epochs": 0}, ConfigError, "epochs must be an integer >= 1"),
        ({"dataset": "svhn", "data_dir": "{tmp}"}, DatasetNotFoundError, "pass --download"),
        ({"augment": True}, ConfigError, "has no training augmentation"),
    ],
)
def test_compare_refuses_bad_options_before_writing(
    tmp_path: Path, tiny_plugin: str, kwargs: dict, error: type, message: str
) -> None:
    out = tmp_path / "cmp"
    options = {"seeds": [0], **kwargs}
    if options.get("data_dir") == "{tmp}":
        options["data_dir"] = str(tmp_path / "data")
    with pytest.raises(error, match=re.escape(message)):
        compare(["bench-tiny-deq"], out_dir=out, log=None, plugins=[tiny_plugin], **options)
    assert not out.exists()


def test_resume_continues_the_same_experiment(tmp_path: Path, tiny_plugin: str) -> None:
    out = tmp_path / "cmp"
    common = {"out_dir": out, "isolate": False, "log": None, "plots": False}
    options = {**SMALL, "plugins": [tiny_plugin]}
    compare(["bench-tiny-deq"], [0], epochs=1, **common, **options)
    before = (out / "runs" / "bench-tiny-deq" / "seed0" / "metrics.csv").read_bytes()
    for change, message in (
        ({"lr": 0.1}, "lr: default there, 0.1 given"),
        ({"epochs": 0}, "epochs must be"),
        ({"dataset": "bench-blobs"}, "dataset: 'mnist5k' there, 'bench-blobs' given"),
    ):
        given = {"epochs": 1, **options, **change}
        with pytest.raises(ConfigError, match=re.escape(message)):
            compare(resume=True, **common, **given)
    assert (out / "runs" / "bench-tiny-deq" / "seed0" / "metrics.csv").read_bytes() == before
    # models and seeds not given: the comparison's; more epochs extend the finished runs
    longer = compare(resume=True, epochs=2, **common, **options)
    (row,) = longer["rows"]
    assert row["model"] == "bench-tiny-deq" and row["seeds"] == [0] and row["epochs"] == 2
    with pytest.raises(ConfigError, match=re.escape("epochs: 2 there, 1 given (runs can only")):
        compare(resume=True, epochs=1, **common, **options)


def test_ctrl_c_leaves_the_table_of_what_finished(
    tmp_path: Path, tiny_plugin: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib

    compare_module = importlib.import_module("pcdeq_plugin.bench.compare")

    real = compare_module.run_one

    def interrupted_on_seed_1(config: dict) -> str | None:
        if config["seed"] == 1:
            raise KeyboardInterrupt
        return real(config)

    monkeypatch.setattr(compare_module, "run_one", interrupted_on_seed_1)
    out = tmp_path / "cmp"
    with pytest.raises(KeyboardInterrupt):
        compare(["bench-tiny-deq"], [0, 1], out_dir=out, isolate=False, log=None,
                plugins=[tiny_plugin], **SMALL)  # fmt: skip
    table = (out / "compare.md").read_text()
    assert "**Interrupted**" in table and "| bench-tiny-deq |" in table
    (saved,) = json.loads((out / "compare.json").read_text())["rows"]
    assert saved["ok"] == 1 and saved["runs"] == 2 and saved["incomplete"] == 1
    # the seed that never started is "not started", not "failed" (issue 13, item 8)
    assert saved["status"] == "partial" and "seed 1: not started" in saved["error"]
    assert "failed" not in saved["error"]
    stopped = {"model": "m", "status": "interrupted", "seed": 0, "error": "KeyboardInterrupt"}
    (row,) = aggregate([stopped])
    assert row[
        "status"
    ] == "interrupted" and "| m | - | default | interrupted |" in render_markdown([row])
    (row,) = aggregate([stopped, {**stopped, "seed": 1, "status": "failed", "error": "boom"}])
    assert row["status"] == "failed"
