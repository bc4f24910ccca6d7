"""The shared backbones: pcdeq-X and deq-X differ only in the cell (issue 12)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pcdeq_plugin import ImplicitBlock, build_model
from pcdeq_plugin.backbones import LinearBackbone, MultiConvBackbone, SingleConvBackbone

ARCHS = {
    "linear": ({"width": 6}, LinearBackbone),
    "single-conv": ({"width": 5}, SingleConvBackbone),
    "multi-conv": ({"widths": (3, 4, 5)}, MultiConvBackbone),
}
SHAPES = [(1, 28, 28), (3, 32, 32), (2, 9, 11)]  # MNIST, SVHN/CIFAR-10, a small odd size


def _non_cell_modules(model: nn.Module) -> list[tuple[str, type, str, list]]:
    """(name, type, hyper-parameters, parameter shapes) of every module outside the cells."""
    cells = [name for name, m in model.named_modules() if isinstance(m, ImplicitBlock)]
    assert cells, "the model has no implicit block"
    rows = []
    for name, module in model.named_modules():
        if not name:  # the model itself: its class names the family
            continue
        if any(name == c or name.startswith(c + ".") for c in cells):
            continue
        own = [tuple(p.shape) for p in module.parameters(recurse=False)]
        rows.append((name, type(module), module.extra_repr(), own))
    return rows


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_pcdeq_and_deq_share_every_non_cell_module(arch, shape):
    sizes, backbone = ARCHS[arch]
    deq = build_model(f"deq-{arch}", shape, 7, **sizes)
    for variant in (1, 2):
        pcdeq = build_model(f"pcdeq-{arch}-{variant}", shape, 7, **sizes)
        assert isinstance(pcdeq, backbone) and isinstance(deq, backbone)
        assert _non_cell_modules(pcdeq) == _non_cell_modules(deq)
        assert [type(b).__name__ for b in deq.implicit_blocks()] != [
            type(b).__name__ for b in pcdeq.implicit_blocks()
        ]
    for model in (deq, pcdeq):
        assert model(torch.rand(2, *shape)).shape == (2, 7)


# the module names of the pcDEQ networks before the backbones were shared: checkpoints
# written then still load
PCDEQ_TOP_LEVEL = {
    "linear": {"linear1", "bn1", "block", "bn2", "classifier"},
    "single-conv": {"conv1", "bn1", "block", "bn2", "classifier"},
    "multi-conv": {
        "conv1",
        "bn1",
        "block1",
        "bn2",
        "downsample1",
        "bn3",
        "block2",
        "bn4",
        "downsample2",
        "bn5",
        "block3",
        "bn6",
        "classifier",
    },
}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_pcdeq_state_dict_names_are_unchanged(arch):
    model = build_model(f"pcdeq-{arch}-1", (1, 28, 28), 10, **ARCHS[arch][0])
    assert {key.split(".")[0] for key in model.state_dict()} == PCDEQ_TOP_LEVEL[arch]


# the deq-* module names before the shared backbones, as the old classes wrote them
OLD_DEQ_MODULES = {
    "linear": ["embed", "bn_in", "deq.layer", "bn_out", "head"],
    "single-conv": ["embed", "bn_in", "deq.layer", "bn_out", "head"],
    "multi-conv": [
        "stage1.0",
        "stage1.1",
        "deq1.layer",
        "stage2.1",
        "stage2.2",
        "stage2.3",
        "deq2.layer",
        "stage3.1",
        "stage3.2",
        "stage3.3",
        "deq3.layer",
        "tail.1",
        "head",
    ],
}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_deq_checkpoints_with_the_old_module_names_still_load(arch):
    sizes = ARCHS[arch][0]
    torch.manual_seed(0)
    source = build_model(f"deq-{arch}", (1, 28, 28), 10, **sizes)
    # the old state dict: the same tensors in the same order under the old module names
    new_keys = list(source.state_dict())
    modules = list(dict.fromkeys(k.rsplit(".", 1)[0] for k in new_keys))
    renamed = dict(zip(modules, OLD_DEQ_MODULES[arch], strict=True))
    old_state = {
        f"{renamed[k.rsplit('.', 1)[0]]}.{k.rsplit('.', 1)[1]}": v.clone() + 1.0
        for k, v in source.state_dict().items()
    }
    torch.manual_seed(1)
    target = build_model(f"deq-{arch}", (1, 28, 28), 10, **sizes)
    target.load_state_dict(old_state)  # strict: every old key found a home
    for key, value in zip(new_keys, old_state.values(), strict=True):
        assert torch.equal(target.state_dict()[key], value)
