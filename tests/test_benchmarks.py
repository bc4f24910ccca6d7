"""Smoke tests of the benchmark scripts in ``benchmarks/`` (tiny settings; no timing asserts)."""

from __future__ import annotations

import copy
import importlib.util
import math
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(name: str) -> ModuleType:
    path = BENCHMARKS / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_bench_pcdeq_prints_a_table_for_each_model_and_solver(capsys):
    bench = load_script("bench_pcdeq")
    models = ["pcdeq-linear-1", "pcdeq-multi-conv-2"]
    rows = bench.main(["--repeats", "1", "--batch", "2", "--models", ",".join(models)])
    out = capsys.readouterr().out
    assert "os.cpu_count()=" in out and "torch " in out
    assert "| model | solver | blocks | fwd ms | fwd+bwd ms | fwd iter | bwd iter |" in out
    assert [(r["model"], r["solver"]) for r in rows] == [
        (m, s) for m in models for s in ("fixed_point", "anderson")
    ]
    for row in rows:
        assert f"| {row['model']} | {row['solver']} |" in out
        assert row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0
        assert row["fwd_iter"] >= row["blocks"] and row["bwd_iter"] >= row["blocks"]
        assert math.isfinite(row["fwd_ratio"]) and row["fwd_ratio"] > 0
    assert {r["blocks"] for r in rows} == {1, 3}


def test_bench_pcdeq_rejects_unknown_names(capsys):
    bench = load_script("bench_pcdeq")
    with pytest.raises(SystemExit):
        bench.main(["--models", "pcdeq-linear-3"])
    err = capsys.readouterr().err
    assert "unknown model(s) ['pcdeq-linear-3']; available:" in err and "pcdeq-linear-1" in err
    with pytest.raises(SystemExit):
        bench.main(["--solvers", "broyden"])
    assert "unknown solver(s) ['broyden']" in capsys.readouterr().err


def test_bench_pcdeq_reports_a_model_without_solver_option_in_its_row(capsys, monkeypatch):
    bench = load_script("bench_pcdeq")

    def refuse(name, solver, **kwargs):
        raise TypeError(f"{name}: unknown option(s) ['solver']; valid options: hidden")

    monkeypatch.setattr(bench, "bench_model", refuse)
    rows = bench.main(
        ["--repeats", "1", "--batch", "2", "--models", "node", "--solvers", "anderson"]
    )
    assert rows == [
        {
            "model": "node",
            "solver": "anderson",
            "error": "error: node: unknown option(s) ['solver']; valid options: hidden",
        }
    ]
    assert (
        "| node | anderson | error: node: unknown option(s) ['solver']" in capsys.readouterr().out
    )


def test_bench_families_in_process_rows_and_ratios(capsys):
    bench = load_script("bench_families")
    rows = bench.main(
        ["--in-process", "--repeats", "1", "--batch", "2", "--models", "pcdeq-linear-1,node"]
    )
    out = capsys.readouterr().out
    assert [r["family"] for r in rows] == ["pcdeq", "node"]
    assert rows[0]["fwd_unit"] == "iter" and rows[1]["fwd_unit"] == "nfe"
    assert all(r["fwd_n"] >= 1 and r["bwd_n"] >= 1 and r["fwd_ms"] > 0 for r in rows)
    assert all(r["peak_mib"] is None for r in rows)  # in-process: no per-model RSS
    assert "| fwd / pcDEQ |" in out and "os.cpu_count()=" in out
    assert "| pcdeq | pcdeq-linear-1 | small |" in out and "| 1.00 | 1.00 | n/a |" in out


def test_bench_families_lists_every_family_and_reports_missing(monkeypatch, capsys):
    bench = load_script("bench_families")
    families = {family for family, _ in bench.default_models()}
    assert {"pcdeq"} <= families
    monkeypatch.setattr(bench, "PREFERRED", {"pcdeq": "pcdeq-linear-1", "quantum": "qdeq-9000"})
    assert ("quantum", None) in bench.default_models()
    monkeypatch.setattr(bench, "default_models", lambda: [("quantum", None)])
    rows = bench.main(["--in-process", "--repeats", "1", "--batch", "2"])
    assert rows == [{"family": "quantum", "model": "qdeq-9000", "error": "missing"}]
    assert "| quantum | qdeq-9000 | missing |" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_families_worker_reports_peak_memory():
    bench = load_script("bench_families")
    args = bench.parse_args(["--repeats", "1", "--batch", "2"])
    row = bench._run_worker("pcdeq-linear-1", args)
    assert row["model"] == "pcdeq-linear-1" and row["fwd_n"] >= 1
    assert row["peak_mib"] is not None and row["peak_mib"] >= 0


def test_both_scripts_share_the_timing_helpers():
    pcdeq, families = load_script("bench_pcdeq"), load_script("bench_families")
    timing = sys.modules["_timing"]
    assert pcdeq.timed is timing.timed and families.timed is timing.timed
    assert pcdeq.machine_description is families.machine_description
    cpu = torch.device("cpu")
    assert timing.timed(lambda: time.sleep(0.02), cpu) >= 0.02
    assert timing.median_time(lambda: None, cpu, 3) >= 0
    line = timing.machine_description(cpu)
    assert line.startswith("machine: ") and "os.cpu_count()=" in line and "device cpu" in line


def test_bench_slow_map_shows_both_solvers_converging(capsys):
    bench = load_script("bench_slow_map")
    bench.main(["--repeats", "1", "--width", "8", "--tol", "1e-6"])
    out = capsys.readouterr().out
    rows = [
        line
        for line in out.splitlines()
        if line.startswith("| fixed_point") or line.startswith("| anderson")
    ]
    assert len(rows) == 2 and all("| True |" in row for row in rows)


def test_bench_refinement_prints_one_row_per_gain_with_converged_solves(capsys):
    bench = load_script("bench_refinement")
    bench.main(
        [
            "--batch",
            "4",
            "--warmup-steps",
            "0",
            "--repeats",
            "1",
            "--gains",
            "1,3",
            "--threads",
            "1",
        ]
    )
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| x")]
    assert [row.split(" | ")[0] for row in rows] == ["| x1", "| x3"]
    for row in rows:
        cells = row.strip("|").split(" | ")
        assert float(cells[3]) < 1e-4  # worst final residual, both settings
        assert float(cells[4]) < 1e-3  # the two answers agree
    with pytest.raises(SystemExit):
        bench.main(["--gains", "0,1"])


# -- bench_speed.py: ours against the paper's algorithm ----------------------------------------


def _flat_grad(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize(
    "name, overrides",
    [("pcdeq-linear-1", {"width": 12}), ("pcdeq-single-conv-2", {"width": 4})],
)
def test_paper_reference_gives_our_fixed_point_and_gradients_in_float64(name, overrides):
    load_script("bench_speed")  # puts the benchmarks folder on sys.path
    import copy

    from _paper_reference import paper_records, paper_reference_model

    from pcdeq_plugin import build_model

    # init_scale 1: a recurrent weight far from tiny, so the solves take real iterations
    ours = build_model(name, (1, 8, 8), 10, tol=1e-11, max_iter=500, init_scale=1.0, **overrides)
    ours = ours.double()
    paper = paper_reference_model(copy.deepcopy(ours), tol=1e-11, max_iter=500)
    x = torch.rand(5, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 10, (5,))
    logits = []
    for model in (ours, paper):
        out = model(x)
        torch.nn.functional.cross_entropy(out, y).backward()
        logits.append(out.detach())
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-9, atol=1e-12)
    ours_grad, paper_grad = _flat_grad(ours), _flat_grad(paper)
    assert float((paper_grad - ours_grad).norm() / ours_grad.norm()) < 1e-8
    (record,) = paper_records(paper)
    assert record.forward_iterations >= 5 and record.backward_iterations >= 3
    assert record.forward_residuals[-1] < 1e-11 < record.forward_residuals[0]


def test_paper_reference_stops_on_the_batch_wide_residual():
    load_script("bench_speed")
    from _paper_reference import paper_fixed_point

    # sample 0: large and fast (rate 0.1); sample 1: small and slow (rate 0.9)
    rate = torch.tensor([[0.1], [0.9]])
    offset = torch.tensor([[100.0], [0.01]])
    z, iterations, residuals = paper_fixed_point(
        lambda z: rate * z + offset, torch.zeros(2, 1), tol=1e-4, max_iter=200
    )
    assert residuals[-1] < 1e-4 and iterations == len(residuals) < 20
    per_sample = ((rate * z + offset) - z).abs() / (rate * z + offset).abs()
    assert per_sample[0] < 1e-4 < per_sample[1]  # the slow sample hid behind the fast one


def test_bench_speed_table_and_agreement_on_the_linear_net(capsys):
    bench = load_script("bench_speed")
    from _speed_setup import parse_case, plain_options

    args = ["--models", "pcdeq-linear-1", "--repeats", "1", "--batch", "8"]
    rows = bench.main([*args, "--warmup-steps", "2", "--test-samples", "24", "--tol", "1e-6"])
    out = capsys.readouterr().out
    header = (
        "| model | threads | variant | train ms | eval ms | train x paper | eval x paper | "
        "fwd it | bwd it | eval it | z* rel | logits rel | worst res | within tol | same pred |"
    )
    assert header in out and "torch " in out and "CPU " in out
    has_options = bool(plain_options(parse_case("pcdeq-linear-1")))
    expected = ["paper", "ours-plain", "ours"] if has_options else ["paper", "ours"]
    assert [r["variant"] for r in rows] == expected
    assert has_options or "ours-plain skipped" in out
    for row in rows:
        assert f"| pcdeq-linear-1 | 1 | {row['variant']} |" in out
        assert row["train_ms"] > 0 and row["eval_ms"] > 0 and row["fwd_it"] >= 2
        assert row["bwd_it"] >= 1 and row["worst_residual"] < 1e-5
    paper, *others = rows
    assert paper["train_x"] == 1.0 and paper["same_pred"] is None
    for row in others:
        assert row["same_pred"] == 1.0 and row["within_tol"] == 1.0
        assert row["z_rel"] < 1e-4 and row["logits_rel"] < 1e-4


def test_bench_speed_bound_row_times_the_network_without_iterations(capsys):
    bench = load_script("bench_speed")
    from _speed_setup import BOUND

    args = ["--models", "pcdeq-single-conv-2", "--repeats", "1", "--batch", "4", "--bound"]
    rows = bench.main([*args, "--warmup-steps", "1", "--test-samples", "8"])
    out = capsys.readouterr().out
    bound = rows[-1]
    assert bound["variant"] == BOUND and f"| {BOUND} |" in out
    assert bound["fwd_it"] == bound["bwd_it"] == 0 and bound["train_ms"] > 0
    assert all(bound[k] is None for k in ("z_rel", "same_pred", "worst_residual"))
    assert {r["variant"] for r in rows[:-1]} >= {"paper", "ours"}  # the others unchanged
    assert all(r["within_tol"] == 1.0 for r in rows[:-1])


def test_bench_speed_floor_row_runs_the_papers_linear_maps_and_nothing_else(capsys):
    bench = load_script("bench_speed")
    from _speed_setup import (
        BOUND,
        FLOOR,
        SolveCounts,
        linear_map_floor_model,
        zero_iteration_model,
    )

    from pcdeq_plugin import build_model

    args = ["--models", "pcdeq-multi-conv-2", "--repeats", "1", "--batch", "4", "--floor"]
    rows = bench.main([*args, "--bound", "--warmup-steps", "1", "--test-samples", "8"])
    out = capsys.readouterr().out
    paper, floor = rows[0], rows[-1]
    assert [r["variant"] for r in rows[-2:]] == [BOUND, FLOOR] and f"| {FLOOR} |" in out
    # one linear map fewer than the paper's iterations per block forward (f(0) is free);
    # the counts come from one batch before the timed steps, so within a step per block
    assert abs(floor["fwd_it"] + 3 - paper["fwd_it"]) <= 3 and floor["fwd_it"] >= 3
    assert abs(floor["bwd_it"] - paper["bwd_it"]) <= 3 and floor["bwd_it"] >= 3
    assert floor["eval_it"] + 3 == paper["eval_it"] and floor["train_ms"] > 0
    assert all(floor[k] is None for k in ("z_rel", "same_pred", "worst_residual"))

    # the floor model: k - 1 linear maps forward, k_b transposed maps backward, and the
    # 0-iteration network's output
    model = build_model("pcdeq-single-conv-1", (1, 28, 28), 10, preset="small")
    reference = zero_iteration_model(copy.deepcopy(model))
    linear_map_floor_model(model, [SolveCounts(forward=4, backward=3, evaluation=6)])
    block = model.block
    calls = []
    block.linear_map = lambda z, w=None, _f=block.linear_map: calls.append("W") or _f(z, w)
    block.transposed_map = lambda y, w, _f=block.transposed_map: calls.append("WT") or _f(y, w)
    x = torch.rand(2, 1, 28, 28)
    model(x).sum().backward()
    reference(x).sum().backward()
    assert calls.count("W") == 1 + 3 and calls.count("WT") == 3  # the cell's own map + 3
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)  # the hooks change no gradient
    calls.clear()
    model.eval(), reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))
    assert calls.count("W") == 1 + 5 and "WT" not in calls
    with pytest.raises(ValueError, match="2 solve counts for 1 blocks"):
        linear_map_floor_model(model, [SolveCounts(1, 1, 1)] * 2)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--models", "pcdeq-linear-3"], "unknown pcDEQ model 'pcdeq-linear-3'; available:"),
        (["--models", "pcdeq-single-conv-1@3x32"], "expected CxHxW"),
        (["--threads", "0"], "threads must be integers >= 1 or 'all'"),
        (["--option", "warm_start"], "expected KEY=VALUE"),
        (["--repeats", "0"], "--repeats must be >= 1"),
    ],
)
def test_bench_speed_rejects_bad_arguments(capsys, argv, message):
    bench = load_script("bench_speed")
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert message in capsys.readouterr().err


def test_bench_speed_parses_cases_and_threads():
    bench = load_script("bench_speed")
    args = bench.parse_args(
        ["--models", "pcdeq-linear-2, pcdeq-single-conv-1@3x32x32", "--threads", "1,all"]
    )
    assert [(c.label, c.input_shape) for c in args.cases] == [
        ("pcdeq-linear-2", (1, 28, 28)),
        ("pcdeq-single-conv-1@3x32x32", (3, 32, 32)),
    ]
    assert args.threads[0] == 1 and args.threads[-1] == bench.all_threads()
    assert bench.parse_args(["--option", "warm_tol=0.02"]).options == {"warm_tol": 0.02}


@pytest.mark.slow
def test_accuracy_fast_vs_plain_trains_both_paths(capsys, monkeypatch):
    script = load_script("accuracy_fast_vs_plain")
    argv = ["--epochs", "1", "--seeds", "0", "--train-limit", "64", "--test-limit", "32"]
    if not script.plain_options(script.Case(script.MODEL, (1, 28, 28))):
        with pytest.raises(SystemExit, match="nothing to compare"):
            script.main(argv)
        return
    accuracy = script.main(argv)
    out = capsys.readouterr().out
    assert set(accuracy) == {"fast defaults", "plain float32"}
    assert all(len(a) == 1 and 0.0 <= a[0] <= 100.0 for a in accuracy.values())
    assert "| path | test acc (%) mean ± std | per seed | train s/epoch |" in out
    assert "fast - plain: " in out and "'warm_start': 'off'" in out
    monkeypatch.setattr(script, "plain_options", lambda case: {})
    with pytest.raises(SystemExit, match="nothing to compare"):
        script.main(argv)


def test_bench_speed_variants_share_weights_and_switch_one_option_each():
    load_script("bench_speed")
    from _speed_setup import ABLATIONS, build_variants, parse_case, plain_options

    case = parse_case("pcdeq-linear-1")
    plain = plain_options(case)
    if not plain:
        pytest.skip("this pcdeq_plugin has no speed options to switch off")
    from pcdeq_plugin import build_model

    weights = build_model(case.model, case.input_shape, 10, init_scale=1.0).state_dict()
    variants, notes = build_variants(
        case, weights, device=torch.device("cpu"), tol=1e-5, ours_options={}, ablations=True
    )
    names = [v.name for v in variants]
    ablated = [name for name, key in ABLATIONS.items() if key in plain]
    assert names == ["paper", "ours-plain", "ours", *ablated]
    assert all(f"{name} skipped" in " ".join(notes) for name in ABLATIONS if name not in ablated)
    for variant in variants:  # the very same weights everywhere
        state = variant.model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in weights.items())
    configs = {v.name: v.model.block.config for v in variants}
    assert all(getattr(configs["ours-plain"], key) == value for key, value in plain.items())
    for name in ablated:  # exactly one option differs from ours
        key = ABLATIONS[name]
        differs = [f for f in plain if getattr(configs[name], f) != getattr(configs["ours"], f)]
        assert differs == [key] and getattr(configs[name], key) == plain[key]
    assert variants[0].is_paper and hasattr(variants[0].model.block, "paper_record")


def test_bench_kernels_prints_each_section_with_the_answers_compared(capsys):
    bench = load_script("bench_kernels")
    sections = ["batchnorm", "maxpool", "softplus", "casts", "convs", "stage", "stem"]
    results = bench.main(["--batch", "2", "--repeats", "1", "--sections", ",".join(sections)])
    out = capsys.readouterr().out
    assert list(results) == sections
    for section in sections:
        assert f"### {section}" in out
        assert all(row["ms"] > 0 and row["threads"] == 1 for row in results[section])
    # the separable pool is the native pool's values, exactly
    assert all(row["rel"] == 0.0 for row in results["maxpool"])
    assert {r["variant"] for r in results["batchnorm"]} >= {
        "channels-last forward", "channels-last backward", "NCHW forward", "NCHW backward",
    }  # fmt: skip
    convs = {(r["state"], r["variant"]): r["rel"] for r in results["convs"]}
    assert convs[("82 ch @ 28x28", "float32")] < 1e-5
    assert convs[("82 ch @ 28x28", "bfloat16")] > 1e-4  # bfloat16 rounding, visibly
    parts = [v for (_, name), v in convs.items() if name.startswith("three bfloat16 parts")]
    assert all(v < 1e-4 for v in parts)  # float32-accurate where the mode exists
    assert "minor page faults" in out
    stem = {r["variant"]: r for r in results["stem"] if r["state"] == "1 -> 12 ch @ 28x28"}
    assert stem["image viewed NHWC (ours), forward"]["rel"] < 1e-6  # the same convolution


def test_bench_kernels_rejects_bad_arguments(capsys):
    bench = load_script("bench_kernels")
    with pytest.raises(SystemExit):
        bench.parse_args(["--sections", "batchnorm,warp"])
    assert "unknown section(s) warp; choose from batchnorm" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(["--repeats", "0"])
    assert "--repeats must be >= 1" in capsys.readouterr().err
    assert "epilogue" in bench.parse_args(["--compile"]).sections
