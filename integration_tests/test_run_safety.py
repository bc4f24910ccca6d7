"""Issue 13 on real processes: two runs into one --out, SIGTERM mid-epoch, SIGINT to the
compare parent's PID only, a compare worker stopped on its own. Each resume must end with
exactly the weights of an uninterrupted run (bitwise)."""

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
TINY = ["--plugin", "bench_tiny_models", "--preset", "small", "--batch-size", "16",
        "--train-limit", "640", "--test-limit", "64", "--device", "cpu"]  # fmt: skip
TRAIN = ["--model", "bench-tiny-deq", "--epochs", "2", "--no-progress", *TINY]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pcdeq_plugin.bench.cli", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": TESTS_BENCH}


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(_cli(*args), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def _wait_for(path: Path, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "last.pt", weights_only=True)["model"]


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key  # bitwise


def _mid_epoch(process: subprocess.Popen, run_dir: Path) -> None:
    """Wait until the first epoch is written (the signal then lands in epoch 2)."""
    _wait_for(run_dir / "metrics.jsonl", process)
    time.sleep(0.05)


@pytest.mark.slow
def test_a_second_run_into_the_same_out_is_refused_and_the_first_is_intact(tmp_path: Path):
    out, release = tmp_path / "run", tmp_path / "release"
    env = {**_env(), "BENCH_TINY_HOLD": str(release)}  # the first run waits in epoch 1
    first = subprocess.Popen(_cli("train", *TRAIN, "--seed", "0", "--out", str(out)), env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        _wait_for(out / "config.json", first)  # past every check, training
        second = subprocess.run(_cli("train", *TRAIN, "--seed", "7", "--out", str(out)),
                                env=_env(), capture_output=True, text=True, timeout=180)  # fmt: skip
    finally:
        release.write_text("go")
    assert second.returncode == 2, second.stderr[-2000:]
    assert "another pcdeq-bench run is writing to" in second.stderr
    _, err = first.communicate(timeout=180)
    assert first.returncode == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seed"] == 0 and summary["status"] == "ok" and summary["epochs_completed"] == 2
    assert json.loads((out / "config.json").read_text())["seed"] == 0
    assert torch.load(out / "last.pt", weights_only=True)["config"]["seed"] == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.mark.slow
def test_sigterm_mid_epoch_then_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    reference = _start("train", *TRAIN, "--out", str(straight))
    child = _start("train", *TRAIN, "--out", str(broken))
    _mid_epoch(child, broken)
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=120)
    assert reference.wait(timeout=180) == 0, reference.stderr.read()
    if child.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert child.returncode == 143, err
    assert "interrupted by SIGTERM" in err and f"--out {broken} --resume" in err
    summary = json.loads((broken / "summary.json").read_text())
    assert summary["status"] == "interrupted" and "SIGTERM" in summary["error"]
    state = torch.load(broken / "last.pt", weights_only=True)
    assert (state["epoch"], state["step"] > 0) == (1, True)  # a mid-epoch checkpoint
    done = subprocess.run(_cli("train", "--out", str(broken), "--resume", "--no-progress", *TINY[:2]),
                          env=_env(), capture_output=True, text=True, timeout=180)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    _assert_same_weights(straight, broken)


COMPARE = ["compare", "--models", "bench-tiny-deq", "--seeds", "0,1", "--epochs", "2",
           "--no-plots", *TINY]  # fmt: skip


def _reference_runs(tmp_path: Path) -> dict[int, tuple[Path, subprocess.Popen]]:
    """What compare's two runs must end as: plain `train` runs with the same options
    (started in the background; :func:`_finished` waits for them)."""
    runs = {seed: tmp_path / f"ref{seed}" for seed in (0, 1)}
    return {
        seed: (out, _start("train", *TRAIN, "--seed", str(seed), "--out", str(out)))
        for seed, out in runs.items()
    }


def _finished(references: dict[int, tuple[Path, subprocess.Popen]]) -> dict[int, Path]:
    for _out, process in references.values():
        assert process.wait(timeout=240) == 0, process.stderr.read()
    return {seed: out for seed, (out, _) in references.items()}


@pytest.mark.slow
def test_sigint_to_the_compare_parent_only_then_resume_is_exact(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    background = _reference_runs(tmp_path)
    child = _start(*COMPARE, "--out", str(out))  # same process group as the test: PID only
    seed0 = out / "runs" / "bench-tiny-deq" / "seed0"
    _mid_epoch(child, seed0)
    os.kill(child.pid, signal.SIGINT)  # not the group: what `kill -INT PID` does
    _, err = child.communicate(timeout=120)
    if child.returncode == 0:
        pytest.skip("compare finished before the signal arrived")
    assert child.returncode == 130, err
    state = torch.load(seed0 / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and state["step"] > 0  # the worker saved mid-epoch 2
    report = json.loads((out / "compare.json").read_text())
    (row,) = report["rows"]
    assert row["status"] == "interrupted" and "seed 1: not started" in row["error"]
    references = _finished(background)
    done = subprocess.run(_cli(*COMPARE, "--out", str(out), "--resume"), env=_env(),
                          capture_output=True, text=True, timeout=240)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    (row,) = json.loads((out / "compare.json").read_text())["rows"]
    assert row["status"] == "ok" and row["ok"] == 2
    for seed, reference in references.items():
        _assert_same_weights(reference, out / "runs" / "bench-tiny-deq" / f"seed{seed}")


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(part) for part in text.split()]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc")
def test_a_worker_stopped_alone_is_interrupted_not_failed_and_exit_is_nonzero(tmp_path: Path):
    out = tmp_path / "cmp"
    child = _start(*COMPARE, "--out", str(out))
    seed0 = out / "runs" / "bench-tiny-deq" / "seed0"
    _mid_epoch(child, seed0)
    (worker,) = _children(child.pid)
    os.kill(worker, signal.SIGTERM)
    _, err = child.communicate(timeout=120)
    (row,) = json.loads((out / "compare.json").read_text())["rows"]
    if row["status"] == "ok":
        pytest.skip("the worker finished before the signal arrived")
    assert child.returncode == 1, err
    assert "incomplete (1 interrupted, 1 not started)" in err and "--resume" in err
    assert row["status"] == "interrupted" and row["incomplete"] == 2
    assert "seed 0: interrupted by SIGTERM" in row["error"]
    assert "seed 1: not started" in row["error"] and "failed" not in row["error"]
