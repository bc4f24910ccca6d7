"""compare and report: tables with mean +- std, failures and unregistered models, plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pcdeq_plugin.bench import compare, write_report
from pcdeq_plugin.bench.config import ConfigError
from pcdeq_plugin.bench.report import aggregate, render_markdown

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
    assert 0 <= tiny["test_acc_mean"] <= 1 and tiny["test_acc_std"] >= 0
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
