"""Shared pieces of the TorchDEQ bridge tests: registry isolation and a pcDEQ-1 cell.

Import the fixtures into a test module (``from torchdeq_support import ...``); the
registry snapshot is autouse there.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchdeq
import torchdeq.core
import torchdeq.norm.base_norm
import torchdeq.solver
from torch import nn
from torchdeq.norm.weight_norm import WeightNorm

import pcdeq_plugin
from pcdeq_plugin.torchdeq_bridge import PcNonnegNorm


@pytest.fixture(autouse=True)
def torchdeq_registries():
    """Snapshot TorchDEQ's process-global registries and restore them after each test."""
    tables = (
        torchdeq.solver._solvers,
        torchdeq.core._core,
        torchdeq.norm.base_norm._norm_class,
        WeightNorm._target_modules,
        PcNonnegNorm._target_modules,
    )
    saved = [dict(table) for table in tables]
    yield
    for table, snapshot in zip(tables, saved):
        table.clear()
        table.update(snapshot)


@pytest.fixture
def registered() -> dict[str, str]:
    return pcdeq_plugin.register()


class PcCell(nn.Module):
    """A pcDEQ-1 cell written TorchDEQ-style: tanh(W z + softplus(U x, beta=5))."""

    def __init__(self, d_in: int, width: int, scale: float = 0.3) -> None:
        super().__init__()
        self.inj = nn.Linear(d_in, width)
        self.W = nn.Linear(width, width, bias=False)
        with torch.no_grad():
            self.W.weight.uniform_(0.0, scale / width)

    def injection(self, x: torch.Tensor) -> torch.Tensor:
        return F.softplus(self.inj(x), beta=5.0)

    def forward(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.W(z) + u)
