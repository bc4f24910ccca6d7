"""Speed options of issue 9 that change no answer: the conv networks' memory layout, the
evaluation path's cost, the predicted check schedule, and the one-reduction finiteness test.

Warm start: tests/test_warm_start.py; merged step and analytic adjoint:
tests/test_adjoint_paths.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from solver_zoo import ZOO, batched_small_maps, slow_tanh_batch
from speed_support import instrument, pre_injection
from test_implicit import count_saved_tensors

import pcdeq_plugin as P
from pcdeq_plugin.cell_map import PcDEQCellMap
from pcdeq_plugin.cells import PcDEQConv, PcDEQLinear
from pcdeq_plugin.checks import all_finite
from pcdeq_plugin.models import resolve_memory_format

MNIST = (1, 28, 28)
CONV_NETS = [f"pcdeq-{arch}-{v}" for arch in ("single-conv", "multi-conv") for v in (1, 2)]

# -- memory layout ---------------------------------------------------------------------------


def _train_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    """Logits, parameter gradients and, per block, the layout of every state it iterated."""
    logs = [instrument(block) for block in model.implicit_blocks()]
    outputs: list[torch.Tensor] = []
    hooks = [
        block.register_forward_hook(lambda _m, _i, out: outputs.append(out))
        for block in model.implicit_blocks()
    ]
    logits = model(x)
    torch.nn.functional.cross_entropy(logits, y).backward()
    for hook in hooks:
        hook.remove()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return logits.detach(), grads, logs, outputs


@pytest.mark.parametrize("name", CONV_NETS)
def test_channels_last_and_contiguous_give_the_same_answers(name: str) -> None:
    # init_scale 2e-3 makes W large enough for 5-20 real iterations (the default 1e-4
    # gives a W so small that the solve is trivial); warm start off: float32 only
    options = dict(preset="small", init_scale=2e-3, tol=1e-6, warm_start="off", on_failure="raise")
    nhwc = P.build_model(name, MNIST, 10, memory_format="channels_last", **options)
    nchw = P.build_model(name, MNIST, 10, memory_format="contiguous", **options)
    nchw.load_state_dict(nhwc.state_dict())
    x, y = torch.rand(4, *MNIST), torch.randint(0, 10, (4,))
    logits_l, grads_l, logs_l, outs_l = _train_step(nhwc, x, y)
    logits_c, grads_c, logs_c, outs_c = _train_step(nchw, x, y)

    # float32; the layouts differ only in the convolutions' summation order (rounding ~1e-7
    # relative), which can move a solve's stop by an iteration: each fixed point is then
    # within tol / (1 - q) ~ 1e-5 of the exact one (q ~ 0.9 here), and the logits (~0.5)
    # differ by some 1e-5 (measured 1.6e-5)
    torch.testing.assert_close(logits_l, logits_c, rtol=1e-4, atol=1e-4)
    for key, grad in grads_c.items():
        # BatchNorm's affine gradients are sums of cancelling terms (measured worst 3e-4
        # relative); biases right before a BatchNorm have an exact gradient of 0, so
        # theirs is float32 noise of ~1e-6: hence the absolute floor
        assert float((grads_l[key] - grad).norm()) <= 2e-3 * float(grad.norm()) + 1e-5, key
    assert any(float(g.norm()) > 0.1 for g in grads_c.values())  # not vacuous

    for log in logs_l:  # every state the solver iterated, and every block output
        assert log.count("cell") > 2 and all(c.channels_last for c in log.cell)
    assert all(out.is_contiguous(memory_format=torch.channels_last) for out in outs_l)
    for log in logs_c:
        assert log.count("cell") > 2 and not any(c.channels_last for c in log.cell)
    assert all(out.is_contiguous() for out in outs_c)


def test_auto_layout_is_chosen_per_device() -> None:
    channels_last, nchw = torch.channels_last, torch.contiguous_format
    assert resolve_memory_format("auto", torch.device("cpu")) == channels_last
    assert resolve_memory_format("auto", torch.device("cuda")) == channels_last
    for other in ("mps", "meta", "xpu"):
        assert resolve_memory_format("auto", torch.device(other)) == nchw
    for device in ("cpu", "cuda", "mps"):  # a forced layout ignores the device
        assert resolve_memory_format("contiguous", torch.device(device)) == nchw
        assert resolve_memory_format("channels_last", torch.device(device)) == channels_last
    model = P.build_model("pcdeq-single-conv-1", MNIST, 10, preset="small")
    assert model.memory_format == "auto"
    outputs: list[torch.Tensor] = []
    model.block.register_forward_hook(lambda _m, _i, out: outputs.append(out))
    with torch.no_grad():
        model(torch.rand(2, *MNIST))
    assert outputs[0].is_contiguous(memory_format=torch.channels_last)  # auto on the CPU


@pytest.mark.parametrize("name", ["pcdeq-single-conv-1", "pcdeq-multi-conv-2"])
def test_a_one_channel_image_is_viewed_nhwc_so_the_stem_answers_nhwc(name: str) -> None:
    # A [B, 1, H, W] image is NCHW and NHWC at once and PyTorch reads it as NCHW; viewed
    # with NHWC strides (no copy) the stem's convolution answers in NHWC itself
    model = P.build_model(name, MNIST, 10, preset="small", memory_format="channels_last")
    nchw = P.build_model(name, MNIST, 10, preset="small", memory_format="contiguous")
    nchw.load_state_dict(model.state_dict())
    stems: list[torch.Tensor] = []
    model.conv1.register_forward_hook(lambda _m, inputs, out: stems.extend((inputs[0], out)))
    x = torch.rand(3, *MNIST)
    x_l, x_c = x.clone().requires_grad_(), x.clone().requires_grad_()
    logits = model(x_l)
    stem_in, stem_out = stems
    assert stem_in.data_ptr() == x_l.data_ptr() and stem_in.stride(1) == 1  # a view
    assert stem_out.is_contiguous(memory_format=torch.channels_last)
    assert not stem_out.is_contiguous()
    # the input gradient (adversarial attacks need it) comes back NCHW, equal to NCHW's
    logits.sum().backward()
    nchw(x_c).sum().backward()
    assert x_l.grad.is_contiguous() and x_l.grad.shape == x.shape
    torch.testing.assert_close(x_l.grad, x_c.grad, rtol=1e-3, atol=1e-5)
    # a 3-channel image is not ambiguous: laid out by a copy as before
    rgb = P.build_model(name, (3, 8, 8) if "single" in name else (3, 9, 9), 10, preset="small")
    seen: list[torch.Tensor] = []
    rgb.conv1.register_forward_hook(lambda _m, inputs, out: seen.append(out))
    with torch.no_grad():
        rgb(torch.rand(2, 3, *((8, 8) if "single" in name else (9, 9))))
    assert seen[0].is_contiguous(memory_format=torch.channels_last)


def test_bad_memory_format_is_refused_with_the_choices() -> None:
    # the message names the bad value and lists the choices (whatever its wording)
    with pytest.raises(ValueError, match="memory_format 'nhwc'.*auto, channels_last, contiguous"):
        P.build_model("pcdeq-single-conv-1", MNIST, 10, preset="small", memory_format="nhwc")
    with pytest.raises(ValueError, match="unknown memory_format"):
        P.build_model("pcdeq-multi-conv-2", MNIST, 10, preset="small", memory_format=None)
    with pytest.raises(TypeError, match="unknown option.*memory_format.*valid options:"):
        P.build_model("pcdeq-linear-1", MNIST, 10, memory_format="channels_last")


# -- the evaluation path -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("warm_start", ["off", "bf16"])
def test_evaluation_costs_the_iterations_and_nothing_more(kind: str, warm_start: str) -> None:
    cls = PcDEQLinear if kind == "linear" else PcDEQConv
    block = cls(6, init_scale=0.05, config=P.SolverConfig(tol=1e-5, warm_start=warm_start))
    pre = pre_injection(kind, n=6, batch=3, dtype=torch.float32).requires_grad_()
    log = instrument(block)
    with torch.no_grad():
        saved = count_saved_tensors(lambda: block(pre))
        log.clear()
        z = block(pre)
    stats = block.last_stats.forward
    assert stats.iterations > 3 and stats.all_converged
    # both phases, no differentiable step; the first iteration from zero is sigma(u); the
    # refinement's corrections are linear maps of the whole batch, its probe evaluates
    # at most one exact image and a few corrections of two samples
    assert log.count("cell", batch=3) == stats.iterations - 1 - stats.refine_iterations
    assert log.count("correction", batch=3) == stats.refine_iterations
    assert log.count("cell", batch=2) <= 1
    assert log.count("cell", torch.bfloat16) == stats.warm_iterations
    assert (stats.warm_iterations > 0) == (warm_start == "bf16")
    assert saved == 0
    assert not z.requires_grad and z.grad_fn is None
    assert block.last_stats.backward is None and log.count("adjoint") == 0


def test_evaluating_a_conv_network_runs_only_its_solves() -> None:
    model = P.build_model("pcdeq-multi-conv-1", MNIST, 10, preset="small", init_scale=2e-3)
    logs = [instrument(block) for block in model.implicit_blocks()]
    with torch.no_grad():
        saved = count_saved_tensors(lambda: model.eval()(torch.rand(3, *MNIST)))
    for log, record in zip(logs, model.solver_stats()):
        assert log.count("cell") == record.forward.iterations - 1 > 1  # f(0) = sigma(u)
    assert saved == 0


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("warm_start", ["off", "bf16"])
def test_a_solve_from_zero_skips_only_the_first_linear_map(kind: str, warm_start: str) -> None:
    # sigma(W 0 + u) is sigma(u) exactly: the same iterates (bit for bit in float32), the
    # same checks, one map fewer
    cls = PcDEQLinear if kind == "linear" else PcDEQConv
    config = P.SolverConfig(tol=1e-5, warm_start=warm_start)
    block = cls(6, init_scale=0.05, config=config)
    pre = pre_injection(kind, n=6, batch=3, dtype=torch.float32)
    with torch.no_grad():
        u = block.injection(pre)
        shortcut = P.solve_implicit(
            PcDEQCellMap(block, u, block.weight), torch.zeros_like(u), config
        )
        plain_map = PcDEQCellMap(block, u, block.weight)
        plain_map.image_of_zero = lambda: None  # the map as if it did not know f(0)
        stats = P.BlockStats("plain")
        plain = P.solve_implicit(plain_map, torch.zeros_like(u), config, stats, zero_start=True)
        stats_short = P.BlockStats("short")
        again = P.solve_implicit(
            PcDEQCellMap(block, u, block.weight), torch.zeros_like(u), config, stats_short
        )
    if warm_start == "off":  # float32 throughout: the same iterates, checked at the same k
        assert stats_short.forward.iterations == stats.forward.iterations > 3
        assert torch.equal(shortcut, plain) and torch.equal(again, plain)
        assert torch.equal(stats_short.forward.residual, stats.forward.residual)
    else:  # the warm phase starts from sigma(u) in float32, not from sigma_bf16(u_bf16)
        assert 0 < stats_short.forward.warm_iterations < stats_short.forward.iterations
        assert abs(stats_short.forward.iterations - stats.forward.iterations) <= 1
        torch.testing.assert_close(shortcut, plain, rtol=0, atol=1e-4)
        assert bool(stats_short.forward.converged.all())


@pytest.mark.parametrize("knows_image", [True, False])
@pytest.mark.parametrize("max_iter", [1, 50])
def test_a_zero_start_reads_only_the_template(knows_image: bool, max_iter: int) -> None:
    # zero_start=True: z0 gives shape, dtype and layout; its values are never read (the
    # block passes its injection instead of filling a state-sized tensor with zeros)
    block = PcDEQConv(6, init_scale=0.05)
    pre = pre_injection("conv", n=6, batch=3, dtype=torch.float32)
    config = P.SolverConfig(tol=1e-5, max_iter=max_iter, warm_start="off", on_failure="ignore")
    answers = []
    with torch.no_grad():
        u = block.injection(pre)
        for template in (torch.zeros_like(u), torch.full_like(u, 7.0)):
            cell_map = PcDEQCellMap(block, u, block.weight)
            if not knows_image:
                cell_map.image_of_zero = lambda: None
            stats = P.BlockStats("b")
            answers.append(P.solve_implicit(cell_map, template, config, stats, zero_start=True))
            answers.append(stats.forward.iterations)
    assert torch.equal(answers[0], answers[2]) and answers[1] == answers[3]
    assert (answers[1] == 1) == (max_iter == 1)  # the cap, or a real solve


def test_a_nonzero_start_is_iterated_from_itself() -> None:
    block = PcDEQLinear(6, init_scale=0.05)
    pre = pre_injection("linear", n=6, batch=3, dtype=torch.float32)
    log = instrument(block)
    with torch.no_grad():
        u = block.injection(pre)
        start = torch.full_like(u, 0.5)
        P.solve_implicit(
            PcDEQCellMap(block, u, block.weight), start, block.config, block.last_stats
        )
    assert log.count("cell") == block.last_stats.forward.iterations  # no f(0) shortcut


# -- the predicted check schedule ----------------------------------------------------------


def _problems():
    for name in sorted(ZOO):
        problem = ZOO[name]()
        yield name, problem.map(), problem.zeros()
    yield "slow_tanh_batch", *slow_tanh_batch((0.5, 0.2, 0.05))


def _compare_schedules(f, z0: torch.Tensor, tol: float, name: str) -> None:
    solver = P.get_solver("fixed_point")
    every = solver(f, z0, tol=tol, max_iter=3000, check_every=1)
    predicted = solver(f, z0, tol=tol, max_iter=3000, check_every=None)
    n1, n = every.stats.iterations, predicted.stats.iterations
    assert every.stats.all_converged and predicted.stats.all_converged, name
    # the same convergence test at a subset of the iterations: the predicted schedule
    # cannot stop earlier than checking every iteration, and must not stop much later
    assert n1 <= n <= n1 + 2, (name, n1, n)
    assert float(predicted.stats.residual.max()) < tol, name
    scale = float(every.value.abs().max())
    assert float((predicted.value - every.value).abs().max()) <= 10 * tol * scale, name


@pytest.mark.parametrize("tol", [1e-5, 1e-10])
def test_predicted_checks_stop_where_checking_every_iteration_would(float64, tol: float) -> None:
    for name, f, z0 in _problems():
        _compare_schedules(f, z0, tol, name)


def test_predicted_checks_do_not_overshoot_after_a_slow_transient(float64) -> None:
    # heterogeneous per-sample maps from random nonnegative starts: one sample plateaus
    # (iterations 5-10) and then converges fast; a rate measured across the plateau and
    # extrapolated to tol stopped this batch at 93 iterations instead of 50
    for seed in range(3):
        f, z0 = batched_small_maps(batch=16, seed=seed)
        for tol in (1e-4, 1e-5, 1e-8):
            _compare_schedules(f, z0, tol, f"batched_small_maps(seed={seed}, tol={tol})")


def test_an_early_check_is_placed_only_where_it_could_pass() -> None:
    from pcdeq_plugin.convergence_checks import EARLY_CHECK_GAIN, CheckSchedule

    # a fast rate: from the zero-start prior (1, 1.0) to 4.8e-3 at iteration 3 is q = 0.069
    # per iteration, so tol 1e-4 is 1.45 iterations away; a check at iteration 4 could
    # pass only if the residual fell 3.3 times below the prediction: check at 5 instead
    schedule = CheckSchedule(None, 1e-4, 100, zero_start=True)
    schedule.observe(3, 4.76e-3, round_up=False)
    assert schedule.next == 5 and EARLY_CHECK_GAIN < 0.069**-0.445
    # a slow rate (q = 0.9): the floor of the prediction needs under 2x, so it checks early
    slow = CheckSchedule(None, 1e-4, 1000, zero_start=False)
    slow.observe(20, 1e-2, round_up=False)
    slow.observe(30, 1e-2 * 0.9**10, round_up=False)  # needed = 33.6 more iterations
    assert slow.next == 30 + min(33, 15)  # the floor, capped at half the iterations done
    slow.observe(45, 1e-2 * 0.9**25, round_up=False)  # needed 18.7: the floor, 18
    assert slow.next == 45 + 18
    # where a check costs more than an evaluation (round_up) the ceiling, as before
    cheap = CheckSchedule(None, 1e-4, 1000, zero_start=False)
    cheap.observe(20, 1e-2, round_up=True)
    cheap.observe(30, 1e-2 * 0.9**10, round_up=True)
    cheap.observe(45, 1e-2 * 0.9**25, round_up=True)
    assert cheap.next == 45 + 19


def test_predicted_checks_are_deterministic(float64) -> None:
    solver = P.get_solver("fixed_point")
    problems = [*_problems(), ("batched_small_maps", *batched_small_maps(batch=16))]
    for name, f, z0 in problems:
        first = solver(f, z0, tol=1e-8, max_iter=3000, check_every=None)
        second = solver(f, z0, tol=1e-8, max_iter=3000, check_every=None)
        assert torch.equal(first.value, second.value), name
        assert torch.equal(first.stats.residual, second.stats.residual), name
        assert torch.equal(first.stats.converged, second.stats.converged), name
        assert first.stats.iterations == second.stats.iterations, name


# -- all_finite ----------------------------------------------------------------------------


def test_all_finite_is_true_for_finite_tensors_whose_sum_overflows() -> None:
    assert all_finite(torch.randn(64, 784))
    assert all_finite(torch.zeros(0))
    huge = torch.full((16,), 3e38)  # each entry finite, their float32 sum is inf
    assert math.isinf(float(huge.sum()))
    assert all_finite(huge)
    assert all_finite(torch.cat((huge, -huge)))
    assert all_finite(torch.full((8,), 6e4, dtype=torch.float16))  # float16 sum overflows
    assert all_finite(torch.randn(3, 4, requires_grad=True))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_all_finite_is_false_for_nan_and_inf(bad: float, dtype: torch.dtype) -> None:
    x = torch.randn(5, 7).to(dtype)
    x[3, 2] = bad
    assert not all_finite(x)
    huge = torch.full((6,), 3e38, dtype=dtype if dtype != torch.bfloat16 else torch.float32)
    huge[4] = bad
    assert not all_finite(huge)  # the elementwise fallback still finds it
    assert not all_finite(torch.tensor([math.inf, -math.inf]))  # sums to NaN
