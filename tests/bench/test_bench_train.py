"""The training loop: files written, exact resume, errors that lose nothing, AMP, devices."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pcdeq_plugin import UnknownNameError
from pcdeq_plugin.bench import run
from pcdeq_plugin.bench.checkpoint import CheckpointError, load_checkpoint
from pcdeq_plugin.bench.config import ConfigError, TrainConfig
from pcdeq_plugin.bench.datasets import DatasetNotFoundError
from pcdeq_plugin.bench.resolve import resolve_config, training_recipe
from pcdeq_plugin.bench.runtime import select_device


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def test_run_writes_metrics_checkpoints_and_calls_the_after_step_hook(tiny_config: dict) -> None:
    import bench_tiny_models

    seen: list[dict] = []
    summary = run({**tiny_config, "epochs": 2}, on_epoch=seen.append)
    out = Path(tiny_config["out_dir"])
    assert summary["status"] == "ok" and summary["epochs_completed"] == 2
    assert {
        "last.pt",
        "best.pt",
        "metrics.jsonl",
        "metrics.csv",
        "summary.json",
        "config.json",
    } <= {p.name for p in out.iterdir()}
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in lines] == [1, 2] and [r["epoch"] for r in seen] == [1, 2]
    row = lines[0]
    assert row["fwd_iters"] > 1 and row["bwd_iters"] == 1.0 and row["unit"] == "iter"
    assert row["test_fwd_iters"] > 1 and row["failed_solves"] == 0
    assert row["peak_mem_kind"] == "cpu_rss_high_water" and row["peak_mem_mb"] > 10
    assert row["train_seconds"] > 0
    from pcdeq_plugin.bench import evaluate_checkpoint

    # the recorded accuracy is that of the saved weights on the same 40 images, exactly
    again = evaluate_checkpoint(out / "last.pt", device="cpu", batch_size=32, limit=40)
    assert again["test_acc"] == lines[-1]["test_acc"] and again["images"] == 40
    assert again["test_acc"] == round(again["test_acc"] * 40) / 40
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[:6] == ["epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc"]
    state = load_checkpoint(out / "last.pt")  # weights_only=True inside
    assert state["epoch"] == 2 and state["step"] == 0 and isinstance(state["config"], dict)
    # 96 images / batch 32 = 3 optimizer steps per epoch, the hook ran after each one
    model = bench_tiny_models.TinyDEQ((1, 28, 28), 10, width=8)
    model.load_state_dict(state["model"])
    assert summary["params"] == sum(p.numel() for p in model.parameters())


def test_after_optimizer_step_runs_after_every_step(tiny_config: dict, monkeypatch) -> None:
    import bench_tiny_models

    calls = []
    original = bench_tiny_models._TinyBlock.after_optimizer_step
    monkeypatch.setattr(
        bench_tiny_models._TinyBlock,
        "after_optimizer_step",
        lambda self: (calls.append(1), original(self)),
    )
    run({**tiny_config, "out_dir": None})
    assert len(calls) == 3


def _final_weights(out_dir: str) -> dict[str, torch.Tensor]:
    return load_checkpoint(Path(out_dir) / "last.pt")["model"]


@pytest.mark.parametrize(
    "stop_at", [(0, 2), (1, 1), (1, 3)], ids=["mid-epoch1", "mid-epoch2", "end-epoch2"]
)
def test_interrupted_then_resumed_equals_uninterrupted(
    tiny_config: dict, tmp_path: Path, stop_at
) -> None:
    # dropout uses the global RNG after the resume point: the RNG state must be restored too
    base = {**tiny_config, "epochs": 2, "model_options": {"dropout": 0.3}}
    straight = run({**base, "out_dir": str(tmp_path / "straight")})

    def interrupt(epoch: int, step: int) -> None:
        if (epoch, step) == stop_at:
            raise KeyboardInterrupt

    broken = str(tmp_path / "broken")
    with pytest.raises(KeyboardInterrupt):
        run({**base, "out_dir": broken}, on_batch=interrupt)
    interrupted = json.loads((Path(broken) / "summary.json").read_text())
    assert interrupted["status"] == "interrupted" and interrupted["epochs_completed"] == stop_at[0]
    state = load_checkpoint(Path(broken) / "last.pt")
    assert (state["epoch"], state["step"]) == stop_at
    resumed = run({"out_dir": broken, "resume": True})
    assert resumed["status"] == "ok" and resumed["epochs_completed"] == 2
    a, b = _final_weights(straight["config"]["out_dir"]), _final_weights(broken)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bitwise
    for x, y in zip(straight["history"], resumed["history"]):
        for key in (
            "train_loss",
            "train_acc",
            "test_acc",
            "test_loss",
            "fwd_iters",
            "failed_solves",
        ):
            assert x[key] == y[key], key


def test_resume_can_extend_epochs_but_not_change_the_experiment(tiny_config: dict) -> None:
    run(tiny_config)
    with pytest.raises(ConfigError, match=r"lr: checkpoint .* vs given 0\.5"):
        run({"out_dir": tiny_config["out_dir"], "resume": True, "lr": 0.5})
    summary = run({"out_dir": tiny_config["out_dir"], "resume": True, "epochs": 2})
    assert summary["epochs_completed"] == 2
    lines = (Path(tiny_config["out_dir"]) / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


def test_corrupt_checkpoint_is_reported_and_left_untouched(tiny_config: dict) -> None:
    run(tiny_config)
    out = Path(tiny_config["out_dir"])
    (out / "last.pt").write_bytes(b"\x80\x02 this is not a checkpoint")
    before = _snapshot(out)
    with pytest.raises(CheckpointError, match="corrupt.*left untouched"):
        run({"out_dir": str(out), "resume": True})
    assert _snapshot(out) == before


def test_existing_run_is_not_overwritten(tiny_config: dict) -> None:
    run(tiny_config)
    out = Path(tiny_config["out_dir"])
    before = _snapshot(out)
    with pytest.raises(ConfigError, match="already holds a run.*--resume"):
        run(tiny_config)
    assert _snapshot(out) == before


def test_unwritable_output_directory(tiny_config: dict, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    with pytest.raises(ConfigError, match="not writable"):
        run({**tiny_config, "out_dir": str(blocker / "run")})
    assert blocker.read_text() == "keep me"


def test_unknown_names_and_keys(tiny_config: dict) -> None:
    with pytest.raises(
        UnknownNameError, match=r"unknown model 'nope'; available: .*bench-tiny-deq"
    ):
        run({**tiny_config, "model": "nope"})
    with pytest.raises(UnknownNameError, match=r"unknown dataset 'nope'; available: .*mnist5k"):
        run({**tiny_config, "dataset": "nope"})
    with pytest.raises(
        ConfigError, match=r"unknown config key\(s\) \['epoch'\]; valid config keys: model, preset"
    ):
        run({**tiny_config, "epoch": 3})
    with pytest.raises(ConfigError, match="unknown amp mode 'fp8'; available: off, bf16, fp16"):
        run({**tiny_config, "amp": "fp8"})
    assert not Path(tiny_config["out_dir"]).exists()


def test_missing_data_writes_nothing(tiny_config: dict, tmp_path: Path) -> None:
    config = {**tiny_config, "dataset": "mnist", "data_dir": str(tmp_path / "nodata")}
    with pytest.raises(DatasetNotFoundError, match="--download"):
        run(config)
    out = Path(config["out_dir"])
    assert not out.exists() or list(out.iterdir()) == []


def test_crashing_model_records_the_failure(tiny_config: dict) -> None:
    with pytest.raises(RuntimeError, match="always fails"):
        run({**tiny_config, "model": "bench-crash"})
    summary = json.loads((Path(tiny_config["out_dir"]) / "summary.json").read_text())
    assert summary["status"] == "failed" and "always fails" in summary["error"]


def test_bf16_autocast_on_cpu(tiny_config: dict) -> None:
    summary = run({**tiny_config, "amp": "bf16", "out_dir": None})
    full = run({**tiny_config, "out_dir": None})
    assert summary["status"] == "ok"
    bf16, fp32 = summary["history"][0]["train_loss"], full["history"][0]["train_loss"]
    # bf16 really ran (the loss differs from float32's) and still trains the same model
    assert bf16 != fp32 and abs(bf16 - fp32) < 0.05 * fp32
    with pytest.raises(ConfigError, match="fp16.*not supported on CPU"):
        run({**tiny_config, "amp": "fp16", "out_dir": None})


def test_same_seed_same_weights_in_deterministic_mode(tiny_config: dict, tmp_path: Path) -> None:
    try:
        a = run({**tiny_config, "deterministic": True, "out_dir": str(tmp_path / "a")})
        b = run({**tiny_config, "deterministic": True, "out_dir": str(tmp_path / "b")})
        c = run({**tiny_config, "seed": 1, "out_dir": str(tmp_path / "c")})
    finally:
        torch.use_deterministic_algorithms(False)
    wa, wb, wc = (_final_weights(s["config"]["out_dir"]) for s in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_device_selection() -> None:
    assert select_device("cpu").type == "cpu"
    assert select_device("auto").type in {"cpu", "cuda", "mps"}
    if not torch.cuda.is_available():
        assert select_device("auto").type != "cuda"  # the current_accelerator pitfall
        with pytest.raises(ConfigError, match="cuda.*not available|is_available"):
            select_device("cuda")


def test_config_precedence_and_recipes(tiny_config: dict) -> None:
    cfg, checkpoint = resolve_config({k: v for k, v in tiny_config.items() if k != "batch_size"})
    assert checkpoint is None
    assert cfg.lr == 1e-3 and cfg.batch_size == 32  # the tiny model's ModelSpec.training
    cfg, _ = resolve_config({**tiny_config, "lr": 0.01})
    assert cfg.lr == 0.01
    recipe = training_recipe(
        {
            "lr": 5e-4,
            "epochs": 40,
            "milestones": [30],
            "per_dataset": {"svhn": {"epochs": 80, "milestones": [70]}},
        },
        "svhn",
    )
    assert recipe == {"lr": 5e-4, "epochs": 80, "milestone": 70}
    # the real pcDEQ recipe: its milestone applies at its own length, not at another one
    cfg, _ = resolve_config({"model": "pcdeq-linear-1", "dataset": "mnist5k", "epochs": 40})
    assert cfg.effective_milestone == 30 and cfg.weight_decay == 1.5e-2
    cfg, _ = resolve_config({"model": "pcdeq-linear-1", "epochs": 8})
    assert cfg.effective_milestone == 6  # 3/4 of the run
    assert TrainConfig(epochs=40).effective_milestone == 30
    assert TrainConfig(epochs=1).effective_milestone is None
    assert TrainConfig(epochs=10, milestone=0).effective_milestone is None


def test_nonfinite_losses_are_counted() -> None:
    from pcdeq_plugin.bench.metrics import EpochMeter

    meter = EpochMeter()
    solve = {"fwd": 3.0, "bwd": None, "unit": "iter", "failed": 2, "residual": float("nan")}
    logits, target = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0])
    meter.update(torch.tensor(float("nan")), logits, target, solve)
    meter.update(torch.tensor(0.5), logits, target, {**solve, "residual": 0.1})
    result = meter.result("")
    assert result["nonfinite_batches"] == 1 and result["failed_solves"] == 4
    assert result["acc"] == 0.5 and result["fwd_iters"] == 3.0
    assert result["max_residual"] == float("inf")  # a NaN residual is reported as unbounded


def test_interrupt_after_an_epoch_resumes_without_duplicate_rows(
    tiny_config: dict, tmp_path: Path
) -> None:
    base = {**tiny_config, "epochs": 2}
    straight = run({**base, "out_dir": str(tmp_path / "straight")})

    def stop_after_first(metrics: dict) -> None:
        raise KeyboardInterrupt

    broken = tmp_path / "broken"
    with pytest.raises(KeyboardInterrupt):
        run({**base, "out_dir": str(broken)}, on_epoch=stop_after_first)
    state = load_checkpoint(broken / "last.pt")
    assert (state["epoch"], state["step"]) == (1, 0)  # the end-of-epoch checkpoint stays
    resumed = run({"out_dir": str(broken), "resume": True})
    assert [r["epoch"] for r in resumed["history"]] == [1, 2]
    a, b = _final_weights(straight["config"]["out_dir"]), _final_weights(str(broken))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_data_order_does_not_depend_on_worker_processes(tiny_config: dict, tmp_path: Path) -> None:
    a = run({**tiny_config, "out_dir": str(tmp_path / "w0")})
    b = run({**tiny_config, "workers": 1, "out_dir": str(tmp_path / "w1")})
    wa, wb = _final_weights(a["config"]["out_dir"]), _final_weights(b["config"]["out_dir"])
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_eval_refuses_a_dataset_of_another_shape(tiny_config: dict) -> None:
    from pcdeq_plugin.bench import evaluate_checkpoint

    run(tiny_config)
    with pytest.raises(
        ConfigError, match=r"trained on 'mnist5k' \(1, 28, 28\).*'cifar10' has \(3, 32, 32\)"
    ):
        evaluate_checkpoint(Path(tiny_config["out_dir"]) / "last.pt", dataset="cifar10")


def test_bad_model_options_and_presets_are_config_errors(tiny_config: dict) -> None:
    with pytest.raises(ConfigError, match="cannot build model 'bench-tiny-deq'.*wdth"):
        run({**tiny_config, "model_options": {"wdth": 3}})
    with pytest.raises(UnknownNameError, match="has no preset 'huge'; available: small"):
        run({**tiny_config, "preset": "huge"})


def test_checkpoint_of_another_shape_is_refused_on_resume(tiny_config: dict) -> None:
    run(tiny_config)
    out = Path(tiny_config["out_dir"])
    state = load_checkpoint(out / "last.pt")
    state["model"]["head.weight"] = torch.zeros(3, 3)
    from pcdeq_plugin.bench.checkpoint import save_checkpoint

    save_checkpoint(out / "last.pt", {k: v for k, v in state.items() if k != "format"})
    before = _snapshot(out)
    with pytest.raises(CheckpointError, match="does not fit model 'bench-tiny-deq'"):
        run({"out_dir": str(out), "resume": True})
    assert _snapshot(out) == before


def test_a_plugin_dataset_trains_through_the_same_loop(tiny_config: dict) -> None:
    config = {
        **tiny_config,
        "dataset": "bench-blobs",
        "epochs": 3,
        "train_limit": None,
        "test_limit": None,
    }
    summary = run({**config, "lr": 0.05, "out_dir": None})
    assert summary["dataset"] == "bench-blobs" and summary["params"] == 16 * 8 + 8 + 64 + 8 * 2 + 2
    assert summary["test_acc"] > 0.9  # separable blobs: the loop really learns


def test_checkpoint_errors_say_what_the_file_is(tmp_path: Path) -> None:
    text = tmp_path / "compare.json"
    text.write_text("{}")
    with pytest.raises(
        CheckpointError, match=r"not a torch checkpoint at all \(it starts with b'\{\}'"
    ):
        load_checkpoint(text)
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"format": "pcdeq-bench-checkpoint/1", "obj": Path("x")}, unsafe)
    with pytest.raises(CheckpointError, match="objects other than plain data.*not loaded unsafely"):
        load_checkpoint(unsafe)
    assert "weights_only" not in str(pytest.raises(CheckpointError, load_checkpoint, unsafe).value)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="not a pcdeq-bench checkpoint"):
        load_checkpoint(foreign)


def test_a_single_sample_last_batch_is_dropped_so_batchnorm_models_train(tiny_config: dict) -> None:
    # 65 images at batch 64 would end on a batch of one, which BatchNorm cannot train on.
    config = {
        **tiny_config,
        "model": "pcdeq-linear-1",
        "plugins": [],
        "batch_size": 64,
        "train_limit": 65,
        "test_limit": 16,
    }
    summary = run(config)
    assert summary["status"] == "ok"
    rows = (Path(tiny_config["out_dir"]) / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 1
