"""Two-process gloo DDP on CPU through torchrun and the real CLI: the weights stay identical
across ranks, metrics are reduced over ranks, and only rank 0 writes files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TESTS_BENCH = str(Path(__file__).resolve().parents[1] / "tests" / "bench")
WORLD = 2


@pytest.mark.slow
def test_torchrun_two_process_gloo_keeps_weights_identical(tmp_path: Path) -> None:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun not installed next to the interpreter")
    out, dumps = tmp_path / "run", tmp_path / "dumps"
    dumps.mkdir()
    config = {
        "model": "bench-tiny-deq",
        "preset": "small",
        "plugins": ["bench_tiny_models"],  # tests/bench/bench_tiny_models.py
        "epochs": 2,
        "batch_size": 16,
        "train_limit": 96,  # 3 steps per rank per epoch
        "test_limit": 50,  # 25 test images per rank
        "device": "cpu",
        "progress": False,
        "out_dir": str(out),
    }
    config_file = tmp_path / "run.json"
    config_file.write_text(json.dumps(config))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": TESTS_BENCH,
        "BENCH_TINY_DUMP": str(dumps),
    }
    done = subprocess.run(
        [torchrun, "--standalone", f"--nproc_per_node={WORLD}", "-m", "pcdeq_plugin.bench.cli",
         "train", "--config", str(config_file)],
        env=env, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]

    w0 = torch.load(dumps / "rank0.pt", weights_only=True)
    w1 = torch.load(dumps / "rank1.pt", weights_only=True)
    for key in w0:
        assert torch.equal(w0[key], w1[key]), key
    saved = torch.load(out / "last.pt", weights_only=True)
    assert all(torch.equal(saved["model"][k], w0[k]) for k in w0)  # rank 0 saved the model
    summary = json.loads((out / "summary.json").read_text())
    assert (
        summary["status"] == "ok"
        and summary["world_size"] == 2
        and summary["epochs_completed"] == 2
    )
    # test accuracy is reduced over both shards: a multiple of 1/50, not of 1/25 only
    assert abs(summary["test_acc"] * 50 - round(summary["test_acc"] * 50)) < 1e-9
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2  # written once by rank 0, not once per rank
    assert saved["epoch"] == 2
