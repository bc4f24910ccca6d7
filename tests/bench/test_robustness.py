"""The robustness axis: attacks in pixel space, clean/adversarial accuracy, the empirical and
certified Lipschitz values, ``eval --attack`` and ``compare --robustness`` end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from pcdeq_plugin import build_model
from pcdeq_plugin.bench.cli import main
from pcdeq_plugin.bench.datasets import load_dataset
from pcdeq_plugin.bench.robustness import (
    PixelSpace,
    attack,
    check_attack,
    check_eps,
    logit_margin,
    robustness_metrics,
)


@pytest.fixture(scope="module")
def trained_lben() -> nn.Module:
    """lben-fc (small preset, gamma 5) trained for two epochs on 512 mnist5k digits."""
    torch.manual_seed(0)
    model = build_model("lben-fc", (1, 28, 28), 10, preset="small", on_failure="ignore")
    data = DataLoader(load_dataset("mnist5k", "train", limit=512), batch_size=64, shuffle=True)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(2):
        for x, y in data:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            model.after_optimizer_step()
    return model.eval()


@pytest.fixture(scope="module")
def test_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(DataLoader(load_dataset("mnist5k", "test", limit=120), batch_size=60))


@pytest.mark.parametrize(
    ("kind", "radii"), [("pgd-l2", [0.0, 1.0, 3.0]), ("fgsm", [0.0, 0.1]), ("pgd-linf", [0.0, 0.1])]
)
def test_attacks_lower_accuracy_and_change_nothing_at_eps_zero(
    trained_lben, test_batches, kind, radii
):
    result = robustness_metrics(trained_lben, test_batches, kind=kind, eps=radii, steps=5)
    at_zero, *attacked = result["adversarial"]
    assert result["clean_acc"] > 0.6  # the model did learn
    assert at_zero["acc"] == result["clean_acc"]
    assert at_zero["loss"] == pytest.approx(result["clean_loss"], rel=1e-6, abs=1e-7)
    assert attacked[-1]["acc"] < result["clean_acc"] - 0.05
    losses = [a["loss"] for a in result["adversarial"]]
    assert all(b >= a - 1e-6 for a, b in zip(losses, losses[1:]))  # larger balls hurt more
    assert result["eps_scale"] == "pixel" and result["images"] == 120


def test_certified_accuracy_is_sound_and_the_lipschitz_estimate_respects_the_bound(
    trained_lben, test_batches
):
    result = robustness_metrics(
        trained_lben, test_batches, kind="pgd-l2", eps=[0.05, 0.5, 2.0], steps=5
    )
    gamma = trained_lben.lipschitz_bound
    assert result["lipschitz_bound"] == gamma  # mnist: the model's inputs are the pixels
    assert 0 < result["lipschitz_empirical"] <= math.sqrt(2) * gamma * (1 + 1e-4)
    certified = [a["certified_acc"] for a in result["adversarial"]]
    # no attack can beat a certificate; certificates shrink as eps grows
    for a in result["adversarial"]:
        assert a["certified_acc"] <= a["acc"] + 1e-12
    assert certified[0] > 0 and certified == sorted(certified, reverse=True)
    # the stated formula: correct with margin > sqrt(2) gamma eps (l2, pixel space)
    with torch.no_grad():
        margins = torch.cat([logit_margin(trained_lben(x), y) for x, y in test_batches])
    for a in result["adversarial"]:
        expected = (margins > math.sqrt(2) * gamma * a["eps"]).double().mean()
        assert a["certified_acc"] == pytest.approx(float(expected), abs=1 / 120 + 1e-9)


def test_no_certificate_for_a_model_without_a_bound(test_batches):
    model = build_model("mondeq-fc", (1, 28, 28), 10, preset="small").eval()
    result = robustness_metrics(model, test_batches[:1], kind="fgsm", eps=[0.1])
    assert result["lipschitz_bound"] is None and result["adversarial"][0]["certified_acc"] is None


@pytest.mark.parametrize("kind", ["pgd-l2", "pgd-linf", "fgsm"])
def test_perturbations_live_in_pixel_space_within_eps(kind):
    torch.manual_seed(1)
    space = PixelSpace((0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5)).eval()
    pixels = torch.rand(6, 3, 4, 4)
    x, y = space.to_inputs(pixels), torch.randint(0, 5, (6,))
    eps = 0.3
    moved = space.to_pixels(attack(model, x, y, kind=kind, eps=eps, space=space, steps=4)) - pixels
    norm = moved.flatten(1).norm(dim=1) if kind == "pgd-l2" else moved.flatten(1).abs().amax(1)
    assert (norm <= eps + 1e-5).all() and norm.max() > 0.5 * eps
    assert (pixels + moved).min() >= -1e-6 and (pixels + moved).max() <= 1 + 1e-6


def test_margin_is_positive_exactly_when_correct():
    logits = torch.tensor([[2.0, 1.0, 0.5], [0.0, 3.0, 1.0]])
    assert torch.allclose(logit_margin(logits, torch.tensor([0, 0])), torch.tensor([1.0, -3.0]))


def test_bad_attack_options_name_the_valid_choices():
    with pytest.raises(ValueError, match="unknown attack 'cw'; available: fgsm, pgd-l2, pgd-linf"):
        check_attack("cw")
    with pytest.raises(ValueError, match=r"eps must be finite numbers >= 0 \(pixel scale"):
        check_eps([0.5, -1])
    with pytest.raises(ValueError, match="at least one radius"):
        check_eps([])
    assert main(["compare", "--robustness", "1,-2", "--models", "lben-fc"]) == 2


@pytest.mark.slow
def test_compare_with_robustness_end_to_end(tmp_path: Path, capsys):
    out = tmp_path / "cmp"
    code = main(
        [
            "compare", "--models", "lben-fc,mondeq-fc", "--seeds", "0", "--epochs", "1",
            "--train-limit", "256", "--test-limit", "64", "--batch-size", "64",
            "--in-process", "--out", str(out), "--robustness", "0.5,2", "--attack", "pgd-l2",
            "--attack-steps", "3",
        ]
    )  # fmt: skip
    assert code == 0
    markdown = (out / "compare.md").read_text()
    assert "## Robustness (pgd-l2, eps in pixel units" in markdown
    assert "adv acc % (eps=0.5)" in markdown and "cert. acc % (eps=2)" in markdown
    rows = {r["model"]: r for r in json.loads((out / "compare.json").read_text())["robustness"]}
    assert (
        rows["lben-fc"]["lipschitz_bound"] == 5.0 and rows["mondeq-fc"]["lipschitz_bound"] is None
    )
    assert (out / "accuracy_vs_eps.png").stat().st_size > 1000
    assert (out / "runs" / "lben-fc" / "seed0" / "robustness.json").is_file()
    # `report` re-renders the section from the runs' files
    assert main(["report", str(out), "--no-plots"]) == 0
    assert "## Robustness" in capsys.readouterr().out
    # and `eval --attack` reports the same axis for one checkpoint
    capsys.readouterr()
    checkpoint = out / "runs" / "lben-fc" / "seed0" / "last.pt"
    args = ["eval", str(checkpoint), "--attack", "fgsm", "--eps", "0,0.1", "--test-limit", "32"]
    assert main(args) == 0
    robust = json.loads(capsys.readouterr().out)["robustness"]
    assert robust["attack"] == "fgsm" and robust["adversarial"][0]["acc"] == robust["clean_acc"]
