"""``pcdeq-bench``: list, train, eval, compare, report.

Examples::

    pcdeq-bench list
    pcdeq-bench train --model pcdeq-linear-1 --preset small --epochs 2 --out runs/lin1
    pcdeq-bench train --out runs/lin1 --resume --epochs 4
    pcdeq-bench eval runs/lin1/best.pt
    pcdeq-bench compare                      # the README's head-to-head on mnist5k
    pcdeq-bench report results/compare
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "main"]


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


_ATTACKS = ("fgsm", "pgd-l2", "pgd-linf")  # pcdeq_plugin.bench.robustness.ATTACKS
_EPS_HELP = (
    "comma-separated radii in PIXEL units of [0, 1] images, for every dataset (SVHN/CIFAR-10 "
    "inputs are un-normalised, perturbed, clipped and normalised again); l2 for pgd-l2, "
    "l_inf for fgsm and pgd-linf"
)


def _add_attack_options(p: argparse.ArgumentParser, default: str | None) -> None:
    g = p.add_argument_group("robustness (plain-torch attacks, model in eval mode)")
    g.add_argument(
        "--attack", choices=_ATTACKS, default=default,
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
    g.add_argument("--optimizer", choices=("adamw", "adam", "sgd"))
    g.add_argument("--lr", type=float, help="learning rate")
    g.add_argument("--weight-decay", dest="weight_decay", type=float)
    g.add_argument("--milestone", type=int, help="the one MultiStepLR milestone (0: none)")
    g.add_argument("--gamma", type=float, help="lr factor at the milestone (default 0.1)")
    g = p.add_argument_group("execution")
    g.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), help="default auto")
    g.add_argument(
        "--amp", choices=("off", "bf16", "fp16"), help="mixed precision (default off; fp16: CUDA)"
    )
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


def build_parser() -> argparse.ArgumentParser:
    """The ``pcdeq-bench`` argument parser (subcommands list, train, eval, compare, report)."""
    from .config import COMPARE_EPOCHS as DEFAULT_EPOCHS

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
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
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
    p.add_argument("--epochs", type=int, help=f"per run (default {DEFAULT_EPOCHS})")
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


def _given(args: argparse.Namespace, keys: Sequence[str]) -> dict[str, Any]:
    out = {}
    for key in keys:
        value = getattr(args, key, None)
        if value is not None:
            out[key] = value
    if "model_options" in out:
        out["model_options"] = dict(out["model_options"])
    return out


_RUN_KEYS = (
    "data_dir", "download", "augment", "train_limit", "test_limit", "workers", "batch_size",
    "test_batch_size", "optimizer", "lr", "weight_decay", "milestone", "gamma", "device", "amp",
    "deterministic", "plugins", "model_options",
)  # fmt: skip


def _cmd_list(args: argparse.Namespace) -> int:
    import pcdeq_plugin as pc
    from pcdeq_plugin.registry import ACTIVATIONS, DATASETS, MODELS, SOLVERS

    from .datasets import ensure_registered
    from .train import load_plugins_from_config

    load_plugins_from_config(args.plugins or [])
    ensure_registered()
    data = {
        "models": {
            n: {"family": s.family, "presets": sorted(s.presets), "description": s.description}
            for n, s in MODELS.items()
        },
        "activations": {
            n: {"kind": s.kind, "description": s.description} for n, s in ACTIVATIONS.items()
        },
        "solvers": {n: {"description": s.description} for n, s in SOLVERS.items()},
        "datasets": {
            n: {
                "shape": list(s.input_shape),
                "classes": s.num_classes,
                "description": s.description,
            }
            for n, s in DATASETS.items()
        },
        "plugins": [
            {
                "name": r.name,
                "source": r.source,
                "distribution": r.distribution,
                "status": r.status,
                "errors": r.errors,
                "provides": r.provides,
            }
            for r in pc.plugin_report()
        ],
    }
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    for section in ("models", "activations", "solvers", "datasets"):
        print(f"{section}:")
        for name, entry in data[section].items():
            extra = ""
            if section == "models":
                extra = f" [{entry['family']}; presets: {', '.join(entry['presets']) or '-'}]"
            elif section == "activations":
                extra = f" [{entry['kind']}]"
            elif section == "datasets":
                extra = f" [{'x'.join(map(str, entry['shape']))}, {entry['classes']} classes]"
            print(f"  {name}{extra}  {entry['description']}".rstrip())
    print("plugins:")
    for record in data["plugins"]:
        where = f" ({record['distribution']})" if record["distribution"] else ""
        print(f"  {record['name']}{where}: {record['status']} [{record['source']}]")
        for error in record["errors"]:
            print(f"      error: {error}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import run

    config: dict[str, Any] = {}
    if args.config is not None:
        try:
            config = json.loads(args.config.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            empty = isinstance(exc, json.JSONDecodeError) and not exc.doc.strip()
            detail = "the file is empty" if empty else str(exc)
            raise _UsageError(
                f"cannot read --config {args.config}: {detail}; it must hold a JSON object of "
                "config keys"
            ) from exc
        if not isinstance(config, dict):
            raise _UsageError(f"--config {args.config} must hold a JSON object of config keys")
        if not config:
            raise _UsageError(
                f"--config {args.config} holds an empty object: give at least one config key "
                '(e.g. {"model": "pcdeq-linear-1", "epochs": 2}), or drop --config'
            )
    config.update(
        _given(
            args,
            (
                "model",
                "preset",
                "dataset",
                "epochs",
                "seed",
                "out_dir",
                "resume",
                "overwrite",
                "progress",
                *_RUN_KEYS,
            ),
        )
    )
    summary = run(config)
    slim = {k: v for k, v in summary.items() if k not in ("history", "config")}
    print(json.dumps(slim, indent=2))
    if summary["status"] != "ok":  # "diverged": the message names the epoch and step
        print(f"pcdeq-bench train: {summary['status']}: {summary['error']}", file=sys.stderr)
        return 1
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_checkpoint

    if args.eps is not None and args.attack is None:
        raise _UsageError(f"--eps needs --attack ({', '.join(_ATTACKS)})")
    attack = {}
    if args.attack is not None:
        attack = {"attack": args.attack, "eps": args.eps or [0.5, 1.0, 2.0]}
        attack["attack_steps"] = args.attack_steps
    result = evaluate_checkpoint(
        args.checkpoint,
        dataset=args.dataset,
        data_dir=args.data_dir,
        download=args.download,
        device=args.device,
        batch_size=args.batch_size,
        limit=args.test_limit,
        plugins=args.plugins or [],
        **attack,
    )
    print(json.dumps(result, indent=2))
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from .compare import DEFAULT_EPOCHS, compare
    from .report import PLAN

    plan: dict[str, Any] = {}
    plan_path = Path(args.out_dir) / PLAN
    if args.resume and plan_path.is_file():
        try:
            plan = json.loads(plan_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise _UsageError(f"cannot resume: {plan_path} is unreadable ({exc})") from exc
    # on --resume, what is not given comes from the comparison being continued -- except
    # plugins: a file in a results directory never causes code to be imported
    earlier = {k: v for k, v in plan.get("train_options", {}).items() if k != "plugins"}
    options = {**earlier, **_given(args, _RUN_KEYS)}
    _note_plan_plugins(plan, options.get("plugins") or [], plan_path)
    preset = args.preset if args.preset is not None else plan.get("preset", "small")
    if args.robustness is not None:  # a bad radius fails before any training
        from .robustness import check_eps

        try:
            check_eps(args.robustness)
        except ValueError as exc:
            raise _UsageError(f"--robustness: {exc}") from exc
    report = compare(
        args.models,
        args.seeds,
        out_dir=args.out_dir,
        dataset=args.dataset or plan.get("dataset", "mnist5k"),
        preset=None if preset == "none" else preset,
        epochs=args.epochs if args.epochs is not None else plan.get("epochs", DEFAULT_EPOCHS),
        isolate=not args.in_process,
        jobs=args.jobs,
        reference=args.reference,
        resume=args.resume,
        plots=not args.no_plots,
        log=lambda msg: print(msg, file=sys.stderr, flush=True),
        **options,
    )
    if args.robustness:
        report = _attack_comparison(args, options)
    print(report["markdown"])
    incomplete = report.get("incomplete") or {}
    if incomplete:
        counts = ", ".join(f"{n} {status}" for status, n in sorted(incomplete.items()))
        print(
            f"pcdeq-bench compare: incomplete ({counts}); continue with: "
            f"pcdeq-bench compare --out {args.out_dir} --resume",
            file=sys.stderr,
        )
        return 1
    return 0


def _attack_comparison(args: argparse.Namespace, options: dict[str, Any]) -> dict[str, Any]:
    from .report import collect_runs, write_report
    from .robustness import check_eps
    from .robustness_report import attack_runs

    attack_runs(
        collect_runs(Path(args.out_dir)),
        attack=args.attack, eps=check_eps(args.robustness), steps=args.attack_steps,
        limit=options.get("test_limit"), device=options.get("device", "auto"),
        plugins=options.get("plugins") or [],
        log=lambda msg: print(msg, file=sys.stderr, flush=True),
    )  # fmt: skip
    return write_report(args.out_dir, plots=not args.no_plots, reference=args.reference)


def _note_plan_plugins(plan: dict[str, Any], given: list[str], plan_path: Path) -> None:
    named = [p for p in (plan.get("train_options") or {}).get("plugins") or [] if p not in given]
    if named:
        flags = " ".join(f"--plugin {name}" for name in named)
        print(
            f"pcdeq-bench compare: note: {plan_path} names plugin module(s) "
            f"{', '.join(named)}; results files never import code, so pass {flags} again if "
            "its models come from them",
            file=sys.stderr,
        )


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    try:
        report = write_report(args.results_dir, plots=not args.no_plots, reference=args.reference)
    except ValueError as exc:  # unknown reference, unreadable plan, unwritable directory
        raise _UsageError(str(exc)) from exc
    print(report["markdown"])
    return 0


class _UsageError(ValueError):
    pass


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status.

    0: done; 1: a run failed or diverged, or a comparison is incomplete; 2: bad input;
    130 / 143: stopped by SIGINT (Ctrl-C) / SIGTERM, after saving what can be resumed.
    """
    args = build_parser().parse_args(argv)
    from .runtime import sigterm_as_interrupt

    with sigterm_as_interrupt():
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    from pcdeq_plugin import PluginError, UnknownNameError

    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .datasets import DatasetNotFoundError

    handlers = {
        "list": _cmd_list,
        "train": _cmd_train,
        "eval": _cmd_eval,
        "compare": _cmd_compare,
        "report": _cmd_report,
    }
    try:
        return handlers[args.command](args)
    except (
        ConfigError,
        UnknownNameError,
        DatasetNotFoundError,
        CheckpointError,
        PluginError,
        _UsageError,
        FileNotFoundError,
    ) as exc:
        print(f"pcdeq-bench {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        from .runtime import RunInterrupted

        name = exc.signal_name if isinstance(exc, RunInterrupted) else "SIGINT"
        code = exc.exit_code if isinstance(exc, RunInterrupted) else 130
        out = getattr(args, "out_dir", None)
        if args.command in ("train", "compare") and out:
            table = (
                f"; table so far in {Path(out) / 'compare.md'}" if args.command == "compare" else ""
            )
            message = (
                f"interrupted by {name}, checkpoint and metrics so far kept{table}; continue "
                f"with: pcdeq-bench {args.command} --out {out} --resume"
            )
        elif args.command == "train":
            message = f"interrupted by {name} (no --out, so nothing was saved)"
        else:
            message = f"interrupted by {name}"
        print(f"pcdeq-bench {args.command}: {message}", file=sys.stderr)
        return code
    except Exception as exc:
        print(f"pcdeq-bench {args.command}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
