"""The installed `pcdeq-bench` console script, run as a user would."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

TESTS_BENCH = str(Path(__file__).resolve().parents[1] / "tests" / "bench")


def _bench() -> str:
    found = shutil.which("pcdeq-bench", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip("pcdeq-bench console script not installed next to the interpreter")
    return found


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": TESTS_BENCH}
    return subprocess.run(
        [_bench(), *args], env=env, capture_output=True, text=True, timeout=300, cwd=cwd
    )


@pytest.mark.slow
def test_console_script_list_train_and_errors(tmp_path: Path) -> None:
    listed = _run("list", "--json")
    assert listed.returncode == 0, listed.stderr
    data = json.loads(listed.stdout)
    assert "mnist5k" in data["datasets"] and data["models"] and data["solvers"]
    assert any(
        p["name"] == "pcdeq_plugin.bench.datasets" and p["status"] == "loaded"
        for p in data["plugins"]
    )

    out = tmp_path / "run"
    trained = _run("train", "--plugin", "bench_tiny_models", "--model", "bench-tiny-deq", "--preset", "small",
                   "--epochs", "1", "--train-limit", "64", "--test-limit", "32", "--batch-size", "32",
                   "--out", str(out), "--no-progress")  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    assert json.loads(trained.stdout)["status"] == "ok"
    assert (out / "metrics.csv").is_file() and (out / "last.pt").is_file()

    unknown = _run("train", "--model", "pcdeq3", "--out", str(tmp_path / "x"))
    assert unknown.returncode == 2 and "unknown model 'pcdeq3'; available:" in unknown.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_console_script_compare_on_a_slice(tmp_path: Path) -> None:
    """`compare` end to end: 2 models x 2 seeds, a few hundred images, table and plots; a
    model whose worker crashes and an unregistered name are reported, the rest still runs
    (two worker processes side by side)."""
    out = tmp_path / "cmp"
    done = _run("compare", "--plugin", "bench_tiny_models", "--models", "bench-crash,bench-tiny-deq,not-a-model",
                "--seeds", "0,1", "--epochs", "2", "--train-limit", "300", "--test-limit", "100",
                "--jobs", "2", "--out", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| bench-tiny-deq |" in done.stdout and "not registered" in done.stdout
    report = json.loads((out / "compare.json").read_text())
    rows = {row["model"]: row for row in report["rows"]}
    assert rows["bench-tiny-deq"]["ok"] == 2
    accuracies = [r["test_acc"] for r in report["runs"] if r["model"] == "bench-tiny-deq"]
    assert rows["bench-tiny-deq"]["test_acc_std"] == pytest.approx(statistics.stdev(accuracies))
    assert rows["bench-tiny-deq"]["test_acc_mean"] == pytest.approx(statistics.fmean(accuracies))
    assert rows["bench-tiny-deq"]["peak_mem_kind"] == "cpu_rss_high_water"
    assert (
        rows["bench-crash"]["status"] == "failed" and "always fails" in rows["bench-crash"]["error"]
    )
    assert rows["not-a-model"]["status"] == "not registered"
    for name in ("accuracy_per_epoch.png", "iterations_per_epoch.png", "accuracy_vs_params.png"):
        assert (out / name).stat().st_size > 1000
    assert rows["bench-tiny-deq"]["epochs"] == 2 and rows["bench-tiny-deq"]["time_ratio"] == 1.0
    assert report["meta"]["jobs"] == 2 and report["meta"]["reference"] == "bench-tiny-deq"
    assert "Timed with 2 worker processes" in done.stdout
    # the crashing worker's traceback is kept next to its runs
    assert "always fails" in (out / "runs" / "bench-crash" / "worker.log").read_text()
