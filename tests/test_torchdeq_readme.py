"""The README's TorchDEQ section runs as written, and the TorchDEQ defect it names is real."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchdeq import get_deq
from torchdeq_support import registered, torchdeq_registries  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
CLIENT = ROOT / "integration_tests" / "torchdeq_cli_client" / "train.py"


def _section_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Inside an existing TorchDEQ codebase", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_command_line_snippet_parses_pcdeq_and_matches_the_client() -> None:
    cli, _, _ = _section_blocks()
    scope: dict = {}
    exec("import argparse\n" + cli, scope)
    args = scope["get_args"](
        ["--f_solver", "pcdeq", "--b_solver", "pcdeq", "--norm_type", "pc_nonneg"]
    )
    assert (args.f_solver, args.b_solver, args.norm_type) == ("pcdeq", "pcdeq", "pc_nonneg")
    added = [line.split("#")[0].strip() for line in cli.splitlines() if "# added" in line]
    in_client = [
        line.split("#")[0].strip()
        for line in CLIENT.read_text().splitlines()
        if line.rstrip().endswith("# pcdeq") or "# pcdeq (" in line
    ]
    assert added == in_client  # the README shows exactly the lines the client adds


def _api_scope() -> dict:
    _, api, _ = _section_blocks()
    scope: dict = {}
    exec(api, scope)
    return scope


def test_api_snippet_runs_and_constrains() -> None:
    scope = _api_scope()
    layer = scope["layer"]
    assert float(layer.W.weight.detach().min()) >= 0
    assert layer.W.weight_v.grad is not None and layer.inj.weight.grad is not None
    assert "pc_min" in scope["info"]


def test_bf16_workaround_snippet_trains() -> None:
    scope = _api_scope()
    _, _, workaround = _section_blocks()
    scope["layer"].zero_grad()
    scope["x"] = torch.randn(scope["B"], scope["D"])
    exec(workaround, scope)
    grad = scope["layer"].W.weight_v.grad
    assert grad is not None and torch.isfinite(grad).all() and float(grad.abs().sum()) > 0


@pytest.mark.usefixtures("registered")
@pytest.mark.parametrize("solver", ["fixed_point_iter", "anderson", "pcdeq"])
def test_bf16_autocast_with_ift_fails_inside_torchdeq(solver) -> None:
    """TorchDEQ's own defect (grad.py re-evaluates f outside autocast), whatever the solver.

    If this starts passing, TorchDEQ fixed it: update the README's TorchDEQ section.
    """
    torch.manual_seed(0)
    recurrent, injection = nn.Linear(8, 8), nn.Linear(4, 8)
    deq = get_deq(f_solver=solver, b_solver=solver, ift=True, f_max_iter=20)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        u = F.softplus(injection(torch.randn(3, 4)))
        z_out, _ = deq(lambda z: torch.tanh(recurrent(z) + u), torch.zeros(3, 8))
        loss = z_out[-1].float().sum()
    with pytest.raises(RuntimeError, match="must have the same dtype") as info:
        loss.backward()
    assert any("torchdeq/grad.py" in str(entry.path).replace("\\", "/") for entry in info.traceback)
