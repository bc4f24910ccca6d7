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

from .config import ATTACKS
from .parser import RUN_KEYS, build_parser, given

__all__ = ["main"]


def _cmd_list(args: argparse.Namespace) -> int:
    import pcdeq_plugin as pc
    from pcdeq_plugin.registry import ACTIVATIONS, DATASETS, MODELS, SOLVERS

    from .resolve import load_plugins_from_config

    load_plugins_from_config(args.plugins or [])
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
    from .session import run

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
        given(
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
                *RUN_KEYS,
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
        raise _UsageError(f"--eps needs --attack ({', '.join(ATTACKS)})")
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
    from .plan import PLAN_NAME, read_plan

    # the one plan reader (compare() reads it through the same function, same messages)
    plan = read_plan(Path(args.out_dir)) if args.resume else {}
    plan_path = Path(args.out_dir) / PLAN_NAME
    # on --resume, what is not given comes from the comparison being continued -- except
    # plugins: a file in a results directory never causes code to be imported
    earlier = {k: v for k, v in plan.get("train_options", {}).items() if k != "plugins"}
    options = {**earlier, **given(args, RUN_KEYS)}
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
