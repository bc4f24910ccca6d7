"""The ``pcdeq-bench`` argument parser: its subcommands, their options and help texts.

Choices (devices, AMP modes, attacks) come from :mod:`.config`, where the configuration
checks them too, and the optimizers from :mod:`pcdeq_plugin.recipes`; the commands themselves are in :mod:`.cli`.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pcdeq_plugin.recipes import OPTIMIZERS

from .config import AMP_MODES, ATTACKS, COMPARE_EPOCHS, DEVICES

__all__ = ["RUN_KEYS", "build_parser", "given"]


def _option(text: str) -> tuple[str, Any]:
    """``key=value`` with the value read as JSON when it parses (``width=64``, ``act="tanh"``)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in _csv(text)]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from exc


def _float_list(text: str) -> list[float]:
    try:
        return [float(part) for part in _csv(text)]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc


_EPS_HELP = (
    "comma-separated radii in PIXEL units of [0, 1] images, for every dataset (SVHN/CIFAR-10 "
    "inputs are un-normalised, perturbed, clipped and normalised again); l2 for pgd-l2, "
    "l_inf for fgsm and pgd-linf"
)


def _add_attack_options(p: argparse.ArgumentParser, default: str | None) -> None:
    g = p.add_argument_group("robustness (plain-torch attacks, model in eval mode)")
    g.add_argument(
        "--attack", choices=ATTACKS, default=default,
        help=f"default {default or 'none (no attack)'}",
    )  # fmt: skip
    g.add_argument(
        "--attack-steps", dest="attack_steps", type=int, default=10,
        help="PGD steps (default 10; step size 2.5 eps / steps)",
    )  # fmt: skip


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """Options shared by train and compare. Defaults are ``None`` (= not given), so a
    resumed run and the model's training presets are only overridden on purpose."""
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", dest="data_dir", help="torchvision dataset root (default ./data)")
    g.add_argument(
        "--download",
        action="store_true",
        default=None,
        help="download a missing torchvision dataset",
    )
    g.add_argument(
        "--augment",
        action="store_true",
        default=None,
        help="training augmentation (CIFAR-10 crop+flip)",
    )
    g.add_argument(
        "--train-limit",
        dest="train_limit",
        type=int,
        help="use a fixed subset of N training images",
    )
    g.add_argument(
        "--test-limit", dest="test_limit", type=int, help="use a fixed subset of N test images"
    )
    g.add_argument("--workers", type=int, help="DataLoader worker processes (default 0)")
    g = p.add_argument_group("optimisation (defaults: the model's presets, then AdamW as in pcDEQ)")
    g.add_argument(
        "--batch-size", dest="batch_size", type=int, help="training batch (per process under DDP)"
    )
    g.add_argument(
        "--test-batch-size", dest="test_batch_size", type=int, help="default: --batch-size"
    )
    g.add_argument("--optimizer", choices=OPTIMIZERS)
    g.add_argument("--lr", type=float, help="learning rate")
    g.add_argument("--weight-decay", dest="weight_decay", type=float)
    g.add_argument("--milestone", type=int, help="the one MultiStepLR milestone (0: none)")
    g.add_argument("--gamma", type=float, help="lr factor at the milestone (default 0.1)")
    g = p.add_argument_group("execution")
    g.add_argument("--device", choices=DEVICES, help="default auto")
    g.add_argument("--amp", choices=AMP_MODES, help="mixed precision (default off; fp16: CUDA)")
    g.add_argument(
        "--deterministic",
        action="store_true",
        default=None,
        help="deterministic kernels (torch.use_deterministic_algorithms)",
    )
    g.add_argument(
        "--plugin",
        dest="plugins",
        action="append",
        metavar="MODULE",
        help="extra plugin module to load",
    )
    g.add_argument(
        "--model-option",
        dest="model_options",
        action="append",
        type=_option,
        metavar="KEY=VALUE",
        help="model factory override, repeatable; VALUE read as JSON when it parses "
        "(width=32, activation=softsign)",
    )
    g.add_argument(
        "--cell",
        metavar="NAME",
        help="registered cell on a backbone model (linear, single-conv, multi-conv), e.g. "
        "--model single-conv --cell deq; the same as --model-option cell=NAME",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``pcdeq-bench`` argument parser (subcommands list, train, eval, compare, report)."""
    parser = argparse.ArgumentParser(
        prog="pcdeq-bench", description="Train and compare implicit models."
    )
    from pcdeq_plugin import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="registered models, activations, solvers, datasets and plugins")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--plugin", dest="plugins", action="append", metavar="MODULE", help="extra plugin module"
    )

    p = sub.add_parser("train", help="train one model")
    p.add_argument("--config", type=Path, help="JSON file of TrainConfig keys (flags override it)")
    p.add_argument("--model", help="registered model (pcdeq-bench list; default pcdeq-linear-1)")
    p.add_argument("--preset", help="model preset, e.g. small, mnist, cifar10")
    p.add_argument("--dataset", help="registered dataset (default mnist5k)")
    p.add_argument("--epochs", type=int, help="default: the model's recipe, else 10")
    p.add_argument("--seed", type=int, help="default 0")
    p.add_argument("--out", dest="out_dir", help="run directory (checkpoints, metrics)")
    p.add_argument("--resume", action="store_true", default=None, help="continue OUT/last.pt")
    p.add_argument(
        "--overwrite",
        action="store_true",
        default=None,
        help="replace an earlier run in OUT (its checkpoints, metrics and summary) instead of "
        "refusing to start",
    )
    p.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        default=None,
        help="no tqdm bars (default: bars only on a terminal)",
    )
    _add_run_options(p)

    p = sub.add_parser("eval", help="evaluate a checkpoint on a dataset")
    p.add_argument("checkpoint", type=Path, help="a last.pt or best.pt written by train")
    p.add_argument("--dataset", help="default: the dataset it was trained on")
    p.add_argument("--data-dir", dest="data_dir", help="default: the one it was trained with")
    p.add_argument("--download", action="store_true", help="download a missing dataset")
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--batch-size", dest="batch_size", type=int, default=256, help="default 256")
    p.add_argument("--test-limit", dest="test_limit", type=int, help="score N test images only")
    p.add_argument(
        "--plugin", dest="plugins", action="append", metavar="MODULE", help="extra plugin module"
    )
    _add_attack_options(p, None)
    p.add_argument("--eps", type=_float_list, help=f"with --attack: {_EPS_HELP} (default 0.5,1,2)")

    p = sub.add_parser(
        "compare",
        help="several models x several seeds -> tables and plots",
        description="Train several models with several seeds through the same loop and write "
        "compare.md, compare.json and PNG plots into --out. With no arguments: the README's "
        "head-to-head (pcDEQ-1, pcDEQ-2, monDEQ, NODE, ANODE, unconstrained DEQ; 'small' "
        "presets; 3 epochs; seeds 0,1,2; mnist5k).",
    )
    p.add_argument(
        "--models", type=_csv, help="comma-separated model names (default: the README's six)"
    )
    p.add_argument("--seeds", type=_int_list, help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--dataset", help="registered dataset (default mnist5k)")
    p.add_argument(
        "--preset",
        help="model preset used where a model has it (default small; 'none': factory defaults)",
    )
    p.add_argument("--epochs", type=int, help=f"per run (default {COMPARE_EPOCHS})")
    p.add_argument(
        "--out",
        dest="out_dir",
        default="results/compare",
        help="results directory (default results/compare); never overwritten without --resume",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the comparison in --out: options not given are the ones it was started "
        "with (models and seeds too); finished runs are reused, interrupted ones resumed, "
        "failed ones retried; --epochs may extend the runs",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="model worker processes at once, one torch thread each (default 1: clean "
        "timings; N>1 ends sooner but the seconds include competing for the cores)",
    )
    p.add_argument(
        "--reference",
        metavar="MODEL",
        help="model the ratio columns divide by (default: the first pcDEQ model)",
    )
    p.add_argument(
        "--in-process",
        action="store_true",
        help="run everything in this process (no crash isolation; peak memory is shared)",
    )
    p.add_argument("--no-plots", action="store_true", help="write the tables only")
    p.add_argument(
        "--robustness", metavar="EPS", type=_float_list,
        help=f"after training, attack every run's last.pt at these radii: {_EPS_HELP}; adds "
        "clean/adversarial accuracy, empirical and certified Lipschitz and certified-robust "
        "accuracy to the table, and accuracy_vs_eps.png",
    )  # fmt: skip
    _add_attack_options(p, "pgd-l2")
    _add_run_options(p)

    p = sub.add_parser(
        "report",
        help="re-render tables and plots from a results directory",
        description="Re-write compare.md, compare.json and the PNG plots from the files in a "
        "results directory (a compare --out, a train --out, or a directory of run directories).",
    )
    p.add_argument("results_dir", type=Path)
    p.add_argument(
        "--reference",
        metavar="MODEL",
        help="model the ratio columns divide by (default: the comparison's, else the first "
        "pcDEQ model)",
    )
    p.add_argument("--no-plots", action="store_true", help="write the tables only")
    return parser


def given(args: argparse.Namespace, keys: Sequence[str]) -> dict[str, Any]:
    out = {}
    for key in keys:
        value = getattr(args, key, None)
        if value is not None:
            out[key] = value
    if "model_options" in out:
        out["model_options"] = dict(out["model_options"])
    cell = getattr(args, "cell", None)
    if cell is not None and "model_options" in keys:  # --cell NAME is --model-option cell=NAME
        out.setdefault("model_options", {})["cell"] = cell
    return out


#: The options train and compare share (TrainConfig keys).
RUN_KEYS = (
    "data_dir", "download", "augment", "train_limit", "test_limit", "workers", "batch_size",
    "test_batch_size", "optimizer", "lr", "weight_decay", "milestone", "gamma", "device", "amp",
    "deterministic", "plugins", "model_options",
)  # fmt: skip
