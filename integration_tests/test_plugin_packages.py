"""Real plugin packages, pip-installed: a good concave activation and a refused convex one.

The two example projects under ``integration_tests/plugins/`` declare an entry point in the
``pcdeq`` group in their own ``pyproject.toml``. They are installed into the running
interpreter's environment (local paths, no network, no dependencies), exercised in fresh
subprocesses (entry points are discovered once per process), and uninstalled afterwards.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

PLUGINS = Path(__file__).parent / "plugins"
PACKAGES = {
    "pcdeq-good-activation": "good_activation",
    "pcdeq-convex-activation": "convex_activation",
}


def _pip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pip", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """Install both example packages (from copies: builds never litter the source tree)."""
    # --no-build-isolation builds with the environment's own setuptools (no network)
    pytest.importorskip("setuptools", reason="building the example plugins needs setuptools")
    work = tmp_path_factory.mktemp("plugin_packages")
    done: list[str] = []
    try:
        for dist, folder in PACKAGES.items():
            source = work / folder
            shutil.copytree(PLUGINS / folder, source)
            result = _pip("install", "--no-deps", "--no-build-isolation", str(source))
            assert result.returncode == 0, f"pip install {dist} failed:\n{result.stderr}"
            done.append(dist)
        yield
    finally:
        if done:
            _pip("uninstall", "-y", *done)


def _run(script: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PCDEQ_")}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**clean, "OMP_NUM_THREADS": "1", **env},
    )


PROBE = """
    import json, warnings
    import torch
    import pcdeq_plugin
    from pcdeq_plugin.plugins import PluginWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        activations = pcdeq_plugin.list_activations()
        models = pcdeq_plugin.list_models()
    plugin_warnings = [str(w.message) for w in caught if issubclass(w.category, PluginWarning)]

    torch.manual_seed(0)
    model = pcdeq_plugin.build_model(
        "pcdeq-linear-1", (1, 8, 8), 10, activation="sqrt1pm1", width=16
    )
    x = torch.rand(4, 1, 8, 8)
    loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    stats = model.solver_stats()[0]
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    report = {r.name: [r.status, r.distribution, r.errors] for r in pcdeq_plugin.plugin_report()}
    print(json.dumps({
        "activations": activations,
        "models": models,
        "warnings": plugin_warnings,
        "provider": pcdeq_plugin.registry.ACTIVATIONS.provider("sqrt1pm1"),
        "loss": float(loss),
        "forward_converged": bool(stats.forward.all_converged),
        "backward_done": stats.backward is not None,
        "all_grads_finite": all(g is not None and bool(torch.isfinite(g).all()) for g in grads),
        "report": report,
    }))
"""


def test_good_plugin_is_usable_and_convex_one_is_refused(installed) -> None:
    result = _run(PROBE)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])

    # the good activation: listed, provided by its entry point, usable by name in a model
    assert "sqrt1pm1" in out["activations"]
    assert out["provider"] == "pcdeq_good_activation"
    assert out["forward_converged"] and out["backward_done"] and out["all_grads_finite"]
    assert math.isfinite(out["loss"]) and out["loss"] > 0

    # the convex one: refused with a warning naming the plugin and the failed condition
    assert "shifted_softplus" not in out["activations"]
    refusal = [w for w in out["warnings"] if "pcdeq_convex_activation" in w]
    assert len(refusal) == 1, out["warnings"]
    assert "pcdeq-convex-activation" in refusal[0]  # the distribution
    assert "'shifted_softplus' refused" in refusal[0]
    assert "not concave on [0, inf): second difference" in refusal[0]
    status, dist, errors = out["report"]["pcdeq_convex_activation"]
    assert status == "failed" and dist == "pcdeq-convex-activation" and errors

    # everything else keeps working: built-ins and the baselines plugin
    assert {"tanh", "softsign", "relu6", "sigmoid"} <= set(out["activations"])
    assert {"pcdeq-linear-1", "node", "anode", "mondeq-fc"} <= set(out["models"])
    assert out["report"]["pcdeq_good_activation"][0] == "loaded"
    assert out["report"]["pcdeq_baselines"][0] == "loaded"


def test_strict_mode_turns_the_refusal_into_an_error(installed) -> None:
    result = _run("import pcdeq_plugin; pcdeq_plugin.list_activations()", PCDEQ_STRICT_PLUGINS="1")
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "pcdeq_plugin.plugins.PluginError: pcdeq plugin 'pcdeq_convex_activation'"
    )
    assert "not concave" in last


def test_blocking_the_bad_plugin_silences_it(installed) -> None:
    result = _run(
        """
        import warnings, pcdeq_plugin
        warnings.simplefilter("error")
        names = pcdeq_plugin.list_activations()
        assert "sqrt1pm1" in names and "shifted_softplus" not in names, names
        print("ok")
        """,
        PCDEQ_BLOCK_PLUGINS="pcdeq_convex_activation,pcdeq_baselines",
        PCDEQ_STRICT_PLUGINS="1",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


CELL_PROBE = """
    import json
    import torch
    import pcdeq_plugin

    out = {"cells": pcdeq_plugin.list_cells(),
           "provider": pcdeq_plugin.catalog.CELLS.provider("pcdeq-sqrt1pm1"), "runs": {}}
    for arch, sizes in (("linear", {"width": 6}), ("single-conv", {"width": 4}),
                        ("multi-conv", {"widths": (3, 4, 5)})):
        torch.manual_seed(0)
        model = pcdeq_plugin.build_model(arch, (1, 12, 12), 10, cell="pcdeq-sqrt1pm1", **sizes)
        loss = torch.nn.functional.cross_entropy(
            model(torch.rand(3, 1, 12, 12)), torch.tensor([0, 1, 2])
        )
        loss.backward()
        kernels = [b.kernel_size for b in model.implicit_blocks() if hasattr(b, "kernel_size")]
        out["runs"][arch] = {
            "stats": [[s.forward.iterations, s.forward.all_converged, s.backward is not None]
                      for s in model.solver_stats()],
            "grads": all(p.grad is not None for p in model.parameters() if p.requires_grad),
            "kernels": kernels,
            "activation": model.implicit_blocks()[0].activation.name,
        }
    print(json.dumps(out))
"""


def test_a_plugin_cell_gets_every_backbone_and_the_harness(installed, tmp_path) -> None:
    result = _run(CELL_PROBE)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"pcdeq-1", "pcdeq-2", "deq", "pcdeq-sqrt1pm1"} <= set(out["cells"])
    assert out["provider"] == "pcdeq_good_activation"
    for arch, run in out["runs"].items():
        assert len(run["stats"]) == (3 if arch == "multi-conv" else 1)
        assert all(
            iters >= 1 and converged and backward for iters, converged, backward in run["stats"]
        )
        assert run["grads"] and run["activation"] == "sqrt1pm1"
        assert run["kernels"] == ([] if arch == "linear" else [5] * len(run["stats"]))

    # the harness: the plugin's cell on a backbone is trained like any registered model
    bench = Path(sys.executable).with_name("pcdeq-bench")
    run_dir = tmp_path / "cell_run"
    trained = subprocess.run(
        [str(bench), "train", "--model", "single-conv", "--cell", "pcdeq-sqrt1pm1",
         "--model-option", "width=4", "--epochs", "1", "--train-limit", "64", "--test-limit",
         "32", "--batch-size", "32", "--out", str(run_dir), "--no-progress"],
        capture_output=True, text=True, timeout=300,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("PCDEQ_")},
             "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    assert json.loads(trained.stdout)["status"] == "ok"
    assert (run_dir / "metrics.csv").is_file() and (run_dir / "last.pt").is_file()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model_options"]["cell"] == "pcdeq-sqrt1pm1"
