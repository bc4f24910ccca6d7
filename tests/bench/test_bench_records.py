"""The typed run records: the files and the report derive from them; old runs still read."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

from pcdeq_plugin.bench.config import TrainConfig
from pcdeq_plugin.bench.metrics import write_history
from pcdeq_plugin.bench.records import EPOCH_COLUMNS, EpochRow, RunSummary
from pcdeq_plugin.bench.report import write_report

IDENTITY = {
    "model": "m",
    "family": "pcdeq",
    "preset": None,
    "dataset": "mnist5k",
    "seed": 0,
    "params": 10,
    "world_size": 1,
    "device": "cpu",
}


def _rows(n: int) -> list[dict]:
    return [
        EpochRow(epoch=e + 1, test_acc=0.5 + e / 10, train_seconds=1.0, fwd_iters=4.0).to_dict()
        for e in range(n)
    ]


def test_the_csv_columns_are_the_epoch_row_fields(tmp_path: Path) -> None:
    assert tuple(f.name for f in dataclasses.fields(EpochRow)) == EPOCH_COLUMNS
    write_history(tmp_path, _rows(2))
    with open(tmp_path / "metrics.csv") as handle:
        header = next(csv.reader(handle))
    assert tuple(header) == EPOCH_COLUMNS
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert set(json.loads(lines[0])) == set(EPOCH_COLUMNS)


def test_the_summary_records_the_milestone_the_run_used() -> None:
    cfg = TrainConfig(epochs=8)  # milestone None: 3/4 of the epochs
    summary = RunSummary.of_run(IDENTITY, _rows(8), {"epoch": 8, "test_acc": 1.2}, "ok", None, cfg)
    assert summary.milestone == 6 and summary.to_dict()["milestone"] == 6
    assert summary.epochs_completed == 8 and summary.fwd_iters == 4.0
    assert RunSummary.from_dict(summary.to_dict()) == summary


def test_an_old_summary_without_a_milestone_still_reports_it(tmp_path: Path) -> None:
    cfg = TrainConfig(epochs=4, milestone=3)
    old = RunSummary.of_run(IDENTITY, _rows(4), {"epoch": 4, "test_acc": 0.8}, "ok", None, cfg)
    data = old.to_dict()
    del data["milestone"]  # as written before summaries recorded it
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text(json.dumps(data))
    assert RunSummary.from_dict(data).milestone == 3
    report = write_report(tmp_path, plots=False)
    assert "lr x0.1 after epoch 3" in report["markdown"]
    (row,) = report["rows"]
    assert row["ok"] == 1 and row["epochs"] == 4


def test_the_report_takes_the_recorded_milestone_not_the_config(tmp_path: Path) -> None:
    cfg = TrainConfig(epochs=4, milestone=3)
    summary = RunSummary.of_run(IDENTITY, _rows(4), {}, "ok", None, cfg).to_dict()
    summary["milestone"] = 2  # what the run recorded wins over a re-derivation
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text(json.dumps(summary))
    assert "lr x0.1 after epoch 2" in write_report(tmp_path, plots=False)["markdown"]
