"""Ctrl-C on a real `pcdeq-bench train` process leaves a usable checkpoint and the metrics
so far; `--resume` then ends with exactly the weights of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

TESTS_BENCH = str(Path(__file__).resolve().parents[1] / "tests" / "bench")
ARGS = [
    "--plugin", "bench_tiny_models", "--model", "bench-tiny-deq", "--preset", "small",
    "--epochs", "4", "--batch-size", "16", "--train-limit", "1600", "--test-limit", "100",
    "--device", "cpu", "--no-progress",
]  # fmt: skip


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pcdeq_plugin.bench.cli", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": TESTS_BENCH}


@pytest.mark.slow
def test_sigint_then_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    reference = subprocess.Popen(_cli("train", *ARGS, "--out", str(straight)), env=_env(),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    child = subprocess.Popen(_cli("train", *ARGS, "--out", str(broken)), env=_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 240
    while not (broken / "metrics.jsonl").exists():  # the first epoch is done
        assert child.poll() is None, child.stderr.read()
        assert time.monotonic() < deadline, "first epoch took too long"
        time.sleep(0.05)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=120)
    assert reference.wait(timeout=300) == 0, reference.stderr.read()
    if child.returncode == 0:
        pytest.skip("the run finished before the signal arrived (machine too fast for this test)")
    assert child.returncode == 130, err
    assert "--resume" in err  # the message tells how to continue

    summary = json.loads((broken / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["epochs_completed"] >= 1
    lines = (broken / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == summary["epochs_completed"]
    state = torch.load(broken / "last.pt", weights_only=True)  # usable, plain data
    assert state["epoch"] < 4

    # plugins come from the command line, never from the checkpoint
    done = subprocess.run(_cli("train", "--out", str(broken), "--resume", "--no-progress",
                               "--plugin", "bench_tiny_models"), env=_env(),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    a = torch.load(straight / "last.pt", weights_only=True)
    b = torch.load(broken / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 4
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key  # bitwise
    assert [r["test_acc"] for r in a["history"]] == [r["test_acc"] for r in b["history"]]


@pytest.mark.slow
def test_ctrl_c_on_compare_then_resume_completes_every_run(tmp_path: Path) -> None:
    """Ctrl-C in a terminal signals the whole process group: compare and its worker."""
    out = tmp_path / "cmp"
    args = ["compare", "--plugin", "bench_tiny_models", "--models", "bench-tiny-deq", "--seeds", "0,1",
            "--epochs", "3", "--batch-size", "16", "--train-limit", "1600", "--test-limit", "100",
            "--no-plots", "--out", str(out)]  # fmt: skip
    child = subprocess.Popen(_cli(*args), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)  # fmt: skip
    first = out / "runs" / "bench-tiny-deq" / "seed0" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not first.exists():
        assert child.poll() is None, child.stderr.read()
        assert time.monotonic() < deadline, "first epoch took too long"
        time.sleep(0.05)
    os.killpg(child.pid, signal.SIGINT)
    _, err = child.communicate(timeout=180)
    if child.returncode == 0:
        pytest.skip("compare finished before the signal arrived")
    assert child.returncode == 130, err
    assert f"pcdeq-bench compare --out {out} --resume" in err
    assert (out / "runs" / "bench-tiny-deq" / "seed0" / "last.pt").is_file()  # the worker saved

    done = subprocess.run(
        _cli(*args, "--resume"), env=_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((out / "compare.json").read_text())
    (row,) = report["rows"]
    assert row["status"] == "ok" and row["ok"] == 2 and row["epochs"] == 3
