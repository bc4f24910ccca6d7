"""A TorchDEQ command-line codebase selects pcDEQ from the command line (issue 10).

``torchdeq_cli_client/train.py`` is written the way TorchDEQ codebases are (argparse with
``add_deq_args``, ``get_deq(args)``, ``apply_norm(model, args=args)``, ``reset_norm`` in
``forward``, a custom layer class, spawned DataLoader workers, EMA by ``deepcopy``, a
checkpoint saved and reloaded); it runs here as a subprocess with
``--f_solver pcdeq --b_solver pcdeq --norm_type pc_nonneg``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torchdeq")

CLIENT = Path(__file__).parent / "torchdeq_cli_client" / "train.py"
SOLVER = "pcdeq_plugin.torchdeq_bridge.solver.pcdeq_solver"
PCDEQ_ARGV = [
    "--f_solver", "pcdeq", "--b_solver", "pcdeq", "--norm_type", "pc_nonneg",
    "--f_stop_mode", "rel", "--f_tol", "1e-4", "--f_max_iter", "60", "--b_max_iter", "60",
    "--ift",
]  # fmt: skip


def test_the_client_adds_at_most_two_pcdeq_statements() -> None:
    """The registration (import + register) and one parser call: nothing else changed."""
    lines = [line for line in CLIENT.read_text().splitlines() if "pcdeq_plugin" in line]
    assert all(line.rstrip().endswith("# pcdeq") or "# pcdeq (" in line for line in lines)
    statements = [line.split("#")[0].strip() for line in lines]
    assert statements == [
        "import pcdeq_plugin",
        'pcdeq_plugin.register("pcdeq")',
        "pcdeq_plugin.add_pcdeq_args(parser)",
    ]


@pytest.mark.slow
def test_command_line_training_with_pcdeq(tmp_path) -> None:
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, str(CLIENT), "--out", str(out), "--workers", "2", *PCDEQ_ARGV],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "PcNonnegNotAppliedWarning" not in done.stderr  # the custom layer was constrained
    metrics = json.loads((out / "metrics.json").read_text())

    # our solver, forward and backward, with its own statistics
    assert metrics["f_solver"] == SOLVER and metrics["b_solver"] == SOLVER
    for record in metrics["forward"]:
        assert "pc_min" in record["keys"] and record["trace_len"] == 61
        assert record["pc_min"] >= 0  # pcDEQ-1 iterates stay in the nonnegative orthant
        assert record["rel_lowest"] < 1e-4  # converged to the requested tolerance
        assert 1 <= record["nstep"] <= 60
    assert len(metrics["backward"]) == len(metrics["losses"])  # IFT ran on every step
    assert all("pc_min" in record["keys"] for record in metrics["backward"])

    # the constraint held throughout, and the recurrence is not dead
    assert min(metrics["weight_min"]) >= 0 and metrics["raw_min"] >= 0
    assert metrics["weight_max"] > 0
    assert metrics["ema_weight_min"] >= 0

    # it trains: the loss falls, and the EMA copy (deepcopy) is a usable model
    losses = metrics["losses"]
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.75 * first, (first, last)
    assert metrics["ema_loss"] < first

    # the checkpoint holds the norm's parameters and reloads to the same model
    assert {"cell.weight_v", "cell.weight_g"} <= set(metrics["state_dict_keys"])
    assert "cell.weight" not in metrics["state_dict_keys"]
    assert metrics["reload_max_diff"] == 0.0
