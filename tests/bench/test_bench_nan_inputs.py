"""Item 6 of issue 13: a NaN input is refused before any module changes state, so one bad
batch cannot poison BatchNorm's running statistics for every later clean input."""

from __future__ import annotations

import pytest
import torch

import pcdeq_plugin as P
from pcdeq_plugin.registry import MODELS

MNIST = (1, 28, 28)


@pytest.mark.parametrize("name", sorted(MODELS.names()))
def test_nan_batch_is_refused_before_batchnorm_statistics_change(name: str) -> None:
    spec = MODELS.get(name)
    preset = "small" if "small" in spec.presets else None
    model = P.build_model(name, MNIST, 10, preset=preset)
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(4, *MNIST)
    x[2, 0, 5, 7] = float("nan")
    with pytest.raises(ValueError, match=r"NaN/Inf"):
        model(x)
    after = model.state_dict()
    changed = [k for k in state if not torch.equal(state[k], after[k])]
    assert changed == [], f"{name}: a refused batch changed {changed}"
    # and a clean batch in eval mode still goes through
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.rand(2, *MNIST))).all()
