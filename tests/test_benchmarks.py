"""Smoke tests of the benchmark scripts in ``benchmarks/`` (tiny settings; no timing asserts)."""

from __future__ import annotations

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
