"""Issue 13, in process: nothing lost, nothing silently wrong.

Run directories (lock, restart), checkpoint writes (crash mid-write, kill between the
``last.pt`` and ``best.pt`` writes), ``best.pt`` choice, divergence, checkpoints that name
plugins or another model, and the mean epoch loss.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pcdeq_plugin.bench import run
from pcdeq_plugin.bench import train as train_module
from pcdeq_plugin.bench.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from pcdeq_plugin.bench.config import ConfigError
from pcdeq_plugin.bench.metrics import EpochMeter


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def _scripted_accuracy(monkeypatch, accuracies: list[float]) -> None:
    """Each epoch's evaluation reports the next accuracy of ``accuracies``."""
    real, calls = train_module.evaluate, iter(accuracies)

    def scripted(*args, **kwargs):
        return {**real(*args, **kwargs), "test_acc": next(calls)}

    monkeypatch.setattr(train_module, "evaluate", scripted)


# -- best.pt -----------------------------------------------------------------------------


def test_best_checkpoint_is_the_most_accurate_epoch(tiny_config: dict, monkeypatch) -> None:
    _scripted_accuracy(monkeypatch, [0.5, 0.7, 0.6])
    summary = run({**tiny_config, "epochs": 3})
    out = Path(tiny_config["out_dir"])
    assert (summary["best_epoch"], summary["best_test_acc"]) == (2, 0.7)
    best, last = load_checkpoint(out / "best.pt"), load_checkpoint(out / "last.pt")
    assert best["epoch"] == 2 and last["epoch"] == 3
    assert not all(torch.equal(best["model"][k], last["model"][k]) for k in best["model"])


class _Killed(BaseException):
    """Stands in for SIGKILL: no handler of the loop catches it, nothing else is written."""


def test_a_kill_between_the_checkpoint_writes_is_repaired_on_resume(
    tiny_config: dict, monkeypatch
) -> None:
    from pcdeq_plugin.bench import rundir

    _scripted_accuracy(monkeypatch, [0.5, 0.7, 0.6])
    real_copy = rundir.copy_file_atomic
    writes = []

    def killed_at_the_second_best(source, target):
        writes.append(Path(target).name)
        if len(writes) == 2:  # epoch 2 improved: last.pt is written, best.pt not yet
            raise _Killed
        real_copy(source, target)

    monkeypatch.setattr(rundir, "copy_file_atomic", killed_at_the_second_best)
    with pytest.raises(_Killed):
        run({**tiny_config, "epochs": 3})
    out = Path(tiny_config["out_dir"])
    epoch_two = load_checkpoint(out / "last.pt")
    assert epoch_two["epoch"] == 2 and epoch_two["best"]["epoch"] == 2
    assert load_checkpoint(out / "best.pt")["epoch"] == 1  # one improvement behind
    monkeypatch.setattr(rundir, "copy_file_atomic", real_copy)
    summary = run({"out_dir": str(out), "resume": True})  # epoch 3 does not improve
    best = load_checkpoint(out / "best.pt")
    assert summary["best_epoch"] == best["epoch"] == 2
    assert json.loads((out / "summary.json").read_text())["best_epoch"] == 2
    assert all(torch.equal(best["model"][k], epoch_two["model"][k]) for k in best["model"])


def test_the_repair_restores_the_best_epoch_from_last_pt(tiny_config: dict, monkeypatch) -> None:
    _scripted_accuracy(monkeypatch, [0.5, 0.7])
    run({**tiny_config, "epochs": 2})
    out = Path(tiny_config["out_dir"])
    last = (out / "last.pt").read_bytes()
    (out / "best.pt").write_bytes(b"\x80 stale")  # as a kill between the writes leaves it
    from pcdeq_plugin.bench.rundir import RunDirectory

    with RunDirectory.open(str(out), resuming=True, overwrite=False) as directory:
        directory.reconcile(load_checkpoint(out / "last.pt"))
    assert (out / "best.pt").read_bytes() == last


# -- checkpoint writes -------------------------------------------------------------------


def test_a_crash_in_the_middle_of_a_checkpoint_write_keeps_the_old_file(
    tmp_path: Path, monkeypatch
) -> None:
    from pcdeq_plugin.bench import checkpoint

    path = tmp_path / "last.pt"
    save_checkpoint(path, {"config": {"model": "m", "dataset": "d"}, "model": {}, "epoch": 1})
    before = path.read_bytes()

    def half_then_crash(obj, handle):
        handle.write(b"PK\x03\x04 half a zip")
        raise _Killed

    monkeypatch.setattr(checkpoint.torch, "save", half_then_crash)
    with pytest.raises(_Killed):
        save_checkpoint(path, {"config": {"model": "m", "dataset": "d"}, "model": {}, "epoch": 2})
    assert path.read_bytes() == before
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary left behind


def test_a_full_disk_is_said_plainly_and_the_checkpoint_kept(
    tiny_config: dict, monkeypatch
) -> None:
    from pcdeq_plugin.bench import checkpoint

    run(tiny_config)
    out = Path(tiny_config["out_dir"])
    before = (out / "last.pt").read_bytes()

    def full(obj, handle):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(CheckpointError, match=r"cannot write .*last\.pt.*disk full.*--resume"):
        run({"out_dir": str(out), "resume": True, "epochs": 2})
    assert (out / "last.pt").read_bytes() == before


# -- the run directory -------------------------------------------------------------------


def test_a_locked_run_directory_is_refused_and_left_alone(tiny_config: dict) -> None:
    from filelock import FileLock

    run(tiny_config)
    out = Path(tiny_config["out_dir"])
    before = _files(out)
    with FileLock(str(out / ".pcdeq-bench.lock")):  # another run holds it
        for config in ({**tiny_config, "overwrite": True}, {"out_dir": str(out), "resume": True}):
            with pytest.raises(ConfigError, match="another pcdeq-bench run is writing to"):
                run(config)
    assert _files(out) == before


def test_a_run_that_failed_in_epoch_one_can_be_restarted(tiny_config: dict) -> None:
    with pytest.raises(RuntimeError, match="always fails"):
        run({**tiny_config, "model": "bench-crash"})
    out = Path(tiny_config["out_dir"])
    assert not (out / "last.pt").exists() and (out / "metrics.jsonl").exists()
    with pytest.raises(ConfigError, match="ended before its first checkpoint.*--overwrite"):
        run(tiny_config)
    with pytest.raises(ConfigError, match=r"cannot resume .*no last\.pt.*--overwrite"):
        run({"out_dir": str(out), "resume": True})
    with pytest.raises(ConfigError, match="contradict"):
        run({**tiny_config, "resume": True, "overwrite": True})
    summary = run({**tiny_config, "overwrite": True})
    assert summary["status"] == "ok" and summary["model"] == "bench-tiny-deq"
    assert json.loads((out / "config.json").read_text())["model"] == "bench-tiny-deq"
    with pytest.raises(ConfigError, match="already holds a run.*--resume.*--overwrite"):
        run(tiny_config)


# -- divergence --------------------------------------------------------------------------


def test_a_nan_loss_stops_the_run_as_diverged_and_keeps_the_last_good_checkpoint(
    tiny_config: dict, monkeypatch
) -> None:
    import bench_tiny_models

    real, calls = bench_tiny_models.TinyDEQ.forward, []

    def poisoned(self, x):
        calls.append(self.training)
        logits = real(self, x)
        trained = sum(calls)  # training forwards so far
        return logits * float("nan") if self.training and trained == 5 else logits

    monkeypatch.setattr(bench_tiny_models.TinyDEQ, "forward", poisoned)
    out = Path(tiny_config["out_dir"])
    seen = []

    def keep_epoch_one(metrics):
        seen.append((out / "last.pt").read_bytes())

    summary = run({**tiny_config, "epochs": 3}, on_epoch=keep_epoch_one)
    assert summary["status"] == "diverged" and summary["epochs_completed"] == 1
    # 3 batches per epoch: the 5th training batch is epoch 2, step 2
    assert "loss was nan at epoch 2, step 2 of 3" in summary["error"]
    assert f"end of epoch 1) was kept in {out / 'last.pt'}" in summary["error"]
    assert (out / "last.pt").read_bytes() == seen[0]  # untouched since epoch 1
    saved = json.loads((out / "summary.json").read_text())
    assert saved["status"] == "diverged"
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


def test_cli_exits_1_on_divergence(tiny_config: dict, monkeypatch, capsys) -> None:
    import bench_tiny_models

    from pcdeq_plugin.bench.cli import main

    monkeypatch.setattr(
        bench_tiny_models.TinyDEQ, "forward", lambda self, x: x[:, 0, 0, :10] * float("inf")
    )
    argv = ["train", "--plugin", "bench_tiny_models", "--model", "bench-tiny-deq", "--preset",
            "small", "--epochs", "1", "--train-limit", "64", "--test-limit", "16",
            "--device", "cpu", "--no-progress"]  # fmt: skip
    assert main(argv) == 1
    assert "diverged: training diverged: the loss was" in capsys.readouterr().err


# -- what a checkpoint may and may not do ------------------------------------------------


def test_a_checkpoint_naming_a_plugin_does_not_import_it(
    tiny_config: dict, tmp_path: Path, monkeypatch, capsys
) -> None:
    from pcdeq_plugin.bench import evaluate_checkpoint

    marker = tmp_path / "imported"
    (tmp_path / "evil_plugin_module.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('code ran')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    run(tiny_config)
    out = Path(tiny_config["out_dir"])
    for name in ("last.pt", "best.pt"):
        state = load_checkpoint(out / name)
        state["config"]["plugins"] = ["evil_plugin_module"]
        save_checkpoint(out / name, {k: v for k, v in state.items() if k != "format"})
    evaluate_checkpoint(out / "best.pt", device="cpu")
    run({"out_dir": str(out), "resume": True, "epochs": 2})
    assert not marker.exists()
    err = capsys.readouterr().err
    assert "evil_plugin_module, which are not loaded: a checkpoint never imports code" in err
    assert "--plugin evil_plugin_module" in err


def test_a_checkpoint_of_another_model_or_without_config_is_refused(tiny_config: dict) -> None:
    from pcdeq_plugin.bench import evaluate_checkpoint

    config = {**tiny_config, "model": "pcdeq-linear-1", "plugins": [], "train_limit": 64}
    run(config)
    out = Path(config["out_dir"])
    state = load_checkpoint(out / "last.pt")
    state["config"]["model"] = "pcdeq-linear-2"  # same tensor shapes, another model
    swapped = {k: v for k, v in state.items() if k != "format"}
    save_checkpoint(out / "last.pt", swapped)
    with pytest.raises(CheckpointError, match="weights of model 'pcdeq-linear-1' but its config"):
        evaluate_checkpoint(out / "last.pt", device="cpu")
    with pytest.raises(CheckpointError, match="weights of model 'pcdeq-linear-1' but its config"):
        run({"out_dir": str(out), "resume": True, "epochs": 2})
    save_checkpoint(out / "last.pt", {**swapped, "config": {}})
    with pytest.raises(CheckpointError, match="no usable config.*an empty one"):
        evaluate_checkpoint(out / "last.pt", device="cpu")


def test_a_plugin_that_raises_at_import_is_named(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "boom_plugin.py").write_text("raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(
        ConfigError, match=r"plugin module 'boom_plugin' .*raised RuntimeError: boom"
    ):
        run({"plugins": ["boom_plugin"], "out_dir": None})


# -- the numbers -------------------------------------------------------------------------


def test_epoch_loss_is_the_mean_over_samples_not_batches() -> None:
    meter = EpochMeter()
    solve = {"fwd": None, "bwd": None, "unit": "", "failed": 0, "residual": None}
    three, one = torch.zeros(3, 2), torch.zeros(1, 2)
    meter.update(torch.tensor(1.0), three, torch.zeros(3, dtype=torch.long), solve)
    meter.update(torch.tensor(4.0), one, torch.ones(1, dtype=torch.long), solve)
    result = meter.result("")
    assert result["loss"] == pytest.approx((3 * 1.0 + 1 * 4.0) / 4)  # 1.75, not 2.5
    assert result["acc"] == pytest.approx(3 / 4)


def test_the_reported_train_loss_is_the_sample_mean_of_the_batch_losses(
    tiny_config: dict, monkeypatch
) -> None:
    """80 images at batch 32: batches of 32, 32 and 16 samples."""
    import torch.nn.functional as F

    losses = []
    real = F.cross_entropy

    def recording(logits, target, *args, **kwargs):
        loss = real(logits, target, *args, **kwargs)
        if torch.is_grad_enabled():
            losses.append((float(loss), int(target.numel())))
        return loss

    monkeypatch.setattr(train_module.F, "cross_entropy", recording)
    summary = run({**tiny_config, "train_limit": 80, "out_dir": None})
    assert [n for _, n in losses] == [32, 32, 16]
    expected = sum(value * n for value, n in losses) / 80
    assert summary["history"][0]["train_loss"] == pytest.approx(expected, rel=1e-12)
