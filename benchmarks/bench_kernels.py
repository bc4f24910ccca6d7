"""The CPU kernels behind the speed notes: what each costs at the networks' state sizes.

``bench_speed.py`` times whole networks; this script times the single operations that
decide what the remaining speed-ups could be (README, "Tried, measured, not adopted"), on
channels-last states of batch ``--batch`` at the sizes of the paper's networks (12 and 24
channels of multi-conv, 16 for comparison, 82 of single-conv), one table per question:

* ``batchnorm``: BatchNorm2d training forward and backward, channels-last and NCHW (the
  channels-last kernel is slow on several threads when the channel count is not a
  multiple of 16);
* ``maxpool``: the native 3x3 stride-1 max pool with indices (training) against the
  separable pool of :mod:`pcdeq_plugin.pooling` (evaluation);
* ``softplus``: ``F.softplus`` against two other forms of the same function (max
  relative difference shown);
* ``casts``: a fresh ``.to(bfloat16)`` against a copy into a kept tensor, and the minor
  page faults of a 6-iteration bfloat16 warm loop (Linux);
* ``convs``: a 3x3 convolution in float32, in bfloat16, in oneDNN's
  ``fp32_precision="bf16"`` mode, and as three bfloat16 parts in that mode (``W_hi z_hi +
  W_hi z_lo + W_lo z_hi``, float32-accurate), with the relative error against float64;
* ``stage``: in a training step of ``pcdeq-multi-conv-1`` (at initialisation), the
  self time of its 12-channel stage's BatchNorms and layout copies (PyTorch profiler)
  under ``memory_format="auto"`` (NCHW BatchNorm on several threads, see
  :mod:`pcdeq_plugin.norms`) and forced ``"channels_last"``;
* ``stem``: the 3x3 stem convolution of a 1-channel 28x28 image to 12 and 82 channels,
  forward and backward (weight and bias gradients), with the image as PyTorch reads it
  (NCHW, so the output and its gradient are copied to channels-last) against the image
  viewed with channels-last strides (``ConvBackbone._layout``: the stem answers NHWC);
* ``epilogue`` (only with ``--compile``; compiling takes seconds): ``tanh(a + u)``,
  ``f(z) - z`` and both per-sample norms as five eager operations against one
  ``torch.compile`` kernel.

Medians of ``--repeats`` calls after warm-up calls; it never asserts on time. Example::

    python benchmarks/bench_kernels.py --threads 1,all --repeats 20
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

if str(Path(__file__).resolve().parent) not in sys.path:  # loaded by path (tests)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import all_threads, cpu_model, thread_settings  # noqa: E402

from pcdeq_plugin.backbones import ConvBackbone  # noqa: E402
from pcdeq_plugin.pooling import separable_max_pool_3x3  # noqa: E402

SECTIONS = ("batchnorm", "maxpool", "softplus", "casts", "convs", "stage", "stem", "epilogue")
#: (channels, side) of the states timed: multi-conv's 12 @ 28 and 24 @ 13, 16 @ 28 for
#: comparison, single-conv's 82 @ 28
SHAPES: tuple[tuple[int, int], ...] = ((12, 28), (16, 28), (24, 13), (82, 28))
CL = torch.channels_last


def median_ms(fn: Callable[[], Any], repeats: int, warmup: int = 3) -> float:
    """Median milliseconds of ``repeats`` calls of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _state(
    batch: int, channels: int, side: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """A reproducible random channels-last state."""
    generator = torch.Generator().manual_seed(channels * 1000 + side)
    x = torch.randn(batch, channels, side, side, generator=generator)
    return x.to(dtype).contiguous(memory_format=CL)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _batchnorm_case(
    batch: int, channels: int, side: int, layout: str, repeats: int
) -> list[dict[str, Any]]:
    fmt = CL if layout == "channels-last" else torch.contiguous_format
    x = _state(batch, channels, side).contiguous(memory_format=fmt).requires_grad_()
    grad = torch.randn_like(x)
    norm = torch.nn.BatchNorm2d(channels).train()
    out = norm(x)
    forward = median_ms(lambda: norm(x), repeats)
    backward = median_ms(lambda: torch.autograd.grad(out, x, grad, retain_graph=True), repeats)
    label = f"{channels} ch @ {side}x{side}"
    return [
        {"state": label, "variant": f"{layout} forward", "ms": forward},
        {"state": label, "variant": f"{layout} backward", "ms": backward},
    ]


def batchnorm_rows(batch: int, repeats: int) -> list[dict[str, Any]]:
    return [
        row
        for channels, side in SHAPES
        for layout in ("channels-last", "NCHW")
        for row in _batchnorm_case(batch, channels, side, layout, repeats)
    ]


def _timed_forms(
    label: str,
    forms: Sequence[tuple[str, Callable[[], torch.Tensor]]],
    reference: Any,
    repeats: int,
) -> list[dict[str, Any]]:
    """One row per form: median ms, and the max relative difference from ``reference``."""
    rows = []
    for name, fn in forms:
        row = {"state": label, "variant": name, "ms": median_ms(fn, repeats)}
        if reference is not None:
            row["rel"] = _rel(fn(), reference)
        rows.append(row)
    return rows  # fmt: skip


def _maxpool_case(batch: int, channels: int, side: int, repeats: int) -> list[dict[str, Any]]:
    x = _state(batch, channels, side)
    forms = (
        ("native, with indices (training)",
         lambda: torch.ops.aten.max_pool2d_with_indices(x, [3, 3], [1, 1], [1, 1])[0]),
        ("separable (evaluation)", lambda: separable_max_pool_3x3(x)),
    )  # fmt: skip
    return _timed_forms(f"{channels} ch @ {side}x{side}", forms, F.max_pool2d(x, 3, 1, 1), repeats)


def maxpool_rows(batch: int, repeats: int) -> list[dict[str, Any]]:
    return [r for c, s in SHAPES for r in _maxpool_case(batch, c, s, repeats)]


def softplus_rows(batch: int, repeats: int) -> list[dict[str, Any]]:
    x = _state(batch, 82, 28) * 2
    zero = torch.zeros((), dtype=x.dtype)
    forms = (
        ("F.softplus", lambda: F.softplus(x)),
        ("logaddexp(x, 0)", lambda: torch.logaddexp(x, zero)),
        ("max(x, 0) + log1p(exp(-|x|))",
         lambda: x.clamp_min(0).add_(x.abs().neg_().exp_().log1p_())),
    )  # fmt: skip
    return _timed_forms("82 ch @ 28x28", forms, F.softplus(x), repeats)


def _minor_faults() -> int | None:
    try:
        import resource
    except ImportError:  # not Unix
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def casts_rows(batch: int, repeats: int) -> list[dict[str, Any]]:
    z = _state(batch, 82, 28)
    kept = torch.empty_like(z, dtype=torch.bfloat16)
    forms = (
        (".to(bfloat16), fresh tensor", lambda: z.to(torch.bfloat16)),
        ("copy_ into a kept bfloat16 tensor", lambda: kept.copy_(z)),
    )
    rows = _timed_forms("82 ch @ 28x28", forms, None, repeats)
    weight = (torch.rand(82, 82, 3, 3) * 2 / (82 * 9)).to(torch.bfloat16)
    u = torch.rand_like(z).to(torch.bfloat16)
    work = torch.empty_like(u)

    def warm_loop() -> None:  # the warm phase's operations, 6 iterations
        state = u
        for _ in range(6):
            image = torch.tanh_(F.conv2d(state, weight, padding=1).add_(u).float())
            image = image.to(torch.bfloat16)
            torch.linalg.vector_norm(torch.sub(image, state, out=work), dim=(1, 2, 3))
            state = image

    warm_loop()
    before = _minor_faults()
    ms = median_ms(warm_loop, max(1, repeats // 4), warmup=1)
    after = _minor_faults()
    faults = None if before is None or after is None else after - before
    rows.append(
        {"state": "82 ch @ 28x28", "variant": "bf16 warm loop, 6 iterations", "ms": ms,
         "faults": faults}
    )  # fmt: skip
    return rows


def _conv_case(batch: int, channels: int, side: int, repeats: int) -> list[dict[str, Any]]:
    z = _state(batch, channels, side).abs_()
    weight = torch.rand(channels, channels, 3, 3) * 2 / (channels * 9)
    exact = F.conv2d(z.double(), weight.double(), padding=1)
    z_hi, w_hi = z.bfloat16(), weight.bfloat16()
    # float32 tensors holding bfloat16 values: convolved in bfloat16 mode, their products
    # are exact and accumulate and come out in float32
    parts_z = (z_hi.float(), (z - z_hi.float()).bfloat16().float())
    parts_w = (w_hi.float(), (weight - w_hi.float()).bfloat16().float())

    def three_parts() -> torch.Tensor:
        out = F.conv2d(parts_z[0], parts_w[0], padding=1)
        out += F.conv2d(parts_z[1], parts_w[0], padding=1)
        return out.add_(F.conv2d(parts_z[0], parts_w[1], padding=1))

    def float32() -> torch.Tensor:
        return F.conv2d(z, weight, padding=1)

    label = f"{channels} ch @ {side}x{side}"
    forms = [("float32", float32), ("bfloat16", lambda: F.conv2d(z_hi, w_hi, padding=1))]
    rows = _timed_forms(label, forms, exact, repeats)
    conv_backend = getattr(torch.backends.mkldnn, "conv", None)
    mode = getattr(conv_backend, "fp32_precision", None)
    if mode is not None:  # oneDNN's implicit bfloat16 for float32 convolutions
        conv_backend.fp32_precision = "bf16"
        try:
            forms = [
                ('float32, fp32_precision="bf16"', float32),
                ('three bfloat16 parts, fp32_precision="bf16"', three_parts),
            ]
            rows += _timed_forms(label, forms, exact, repeats)
        finally:
            conv_backend.fp32_precision = mode
    return rows


def convs_rows(batch: int, repeats: int) -> list[dict[str, Any]]:
    return [r for c, s in ((12, 28), (82, 28)) for r in _conv_case(batch, c, s, repeats)]


def _epilogue(
    a: torch.Tensor, u: torch.Tensor, z: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    image = torch.tanh(a + u)
    delta = image - z
    return image, delta.square().sum((1, 2, 3)), image.square().sum((1, 2, 3))


def _epilogue_case(
    batch: int, channels: int, side: int, repeats: int, compiled: Any
) -> list[dict[str, Any]]:
    a, u, z = (_state(batch, channels, side) for _ in range(3))
    work = torch.empty_like(z)
    scratch = torch.empty_like(a)

    def eager() -> None:  # the solve's five passes, in place where it can
        image = torch.tanh_(torch.add(a, u, out=scratch))
        torch.linalg.vector_norm(torch.sub(image, z, out=work), dim=(1, 2, 3))
        torch.linalg.vector_norm(image, dim=(1, 2, 3))

    start = time.perf_counter()
    compiled(a, u, z)
    first = time.perf_counter() - start
    forms = (
        ("eager (5 operations)", eager),
        (f"torch.compile (first call {first:.1f} s)", lambda: compiled(a, u, z)),
    )
    return _timed_forms(f"{channels} ch @ {side}x{side}", forms, None, repeats)


def epilogue_rows(batch: int, repeats: int) -> list[dict[str, Any]]:
    compiled = torch.compile(_epilogue)
    return [
        r for c, s in ((12, 28), (82, 28)) for r in _epilogue_case(batch, c, s, repeats, compiled)
    ]


def _stage_norm_ms(memory_format: str, batch: int, repeats: int) -> float:
    """Self ms per training step of the 12-channel stage's BatchNorms and layout copies."""
    from torch.profiler import ProfilerActivity, profile

    from pcdeq_plugin import build_model

    torch.manual_seed(0)
    model = build_model("pcdeq-multi-conv-1", (1, 28, 28), 10, memory_format=memory_format)
    model.train()
    x, y = torch.rand(batch, 1, 28, 28), torch.arange(batch) % 10

    def step() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(repeats):
            step()
    stage = f"[{batch}, 12, 28, 28]"
    total = sum(
        event.self_cpu_time_total
        for event in prof.key_averages(group_by_input_shape=True)
        if ("batch_norm" in event.key or event.key == "aten::copy_")
        and str(event.input_shapes).replace(" ", "").startswith(f"[{stage}".replace(" ", ""))
    )
    return total / repeats / 1e3


def stage_rows(batch: int, repeats: int) -> list[dict[str, Any]]:
    """multi-conv-1's 12-channel BatchNorms in a training step, auto against channels-last."""
    label = "multi-conv-1, 12-ch stage"
    return [
        {"state": label, "variant": f'memory_format="{fmt}": BatchNorm + copies (profiler)',
         "ms": _stage_norm_ms(fmt, batch, max(2, repeats // 2))}
        for fmt in ("auto", "channels_last")
    ]  # fmt: skip


def _stem_case(batch: int, channels: int, repeats: int) -> list[dict[str, Any]]:
    generator = torch.Generator().manual_seed(channels)
    image = torch.rand(batch, 1, 28, 28, generator=generator)  # NCHW, as a loader gives it
    conv = torch.nn.Conv2d(1, channels, 3, padding=1)
    viewed = ConvBackbone(  # the library's layout step, on a bare backbone
        (1, 28, 28), "channels_last"
    )._layout(image)
    forms = {
        "NCHW image, output copied to NHWC": lambda: conv(image).contiguous(memory_format=CL),
        "image viewed NHWC (ours)": lambda: conv(viewed),
    }
    reference = forms["NCHW image, output copied to NHWC"]().detach()
    rows = []
    label = f"1 -> {channels} ch @ 28x28"
    for name, forward in forms.items():
        out = forward()
        grad = torch.randn_like(out)
        params = list(conv.parameters())
        rows.append(
            {"state": label, "variant": f"{name}, forward", "ms": median_ms(forward, repeats),
             "rel": _rel(out.detach(), reference)}
        )  # fmt: skip

        def backward(
            forward: Callable[[], torch.Tensor] = forward,
            params: list[torch.Tensor] = params,
            grad: torch.Tensor = grad,
        ) -> None:
            torch.autograd.grad(forward(), params, grad)

        # the backward alone: forward + backward minus the forward just timed
        total = median_ms(backward, repeats)
        rows.append({"state": label, "variant": f"{name}, backward", "ms": total - rows[-1]["ms"]})
    return rows


def stem_rows(batch: int, repeats: int) -> list[dict[str, Any]]:
    return [r for channels in (12, 82) for r in _stem_case(batch, channels, repeats)]


RUNNERS: dict[str, Callable[[int, int], list[dict[str, Any]]]] = {
    "batchnorm": batchnorm_rows,
    "maxpool": maxpool_rows,
    "softplus": softplus_rows,
    "casts": casts_rows,
    "convs": convs_rows,
    "epilogue": epilogue_rows,
    "stage": stage_rows,
    "stem": stem_rows,
}


def format_table(section: str, rows: Sequence[dict[str, Any]]) -> str:
    """One section's rows as a Markdown table (columns as the rows have them)."""
    extra = [key for key in ("rel", "faults") if any(key in r for r in rows)]
    titles = {"rel": "max rel diff", "faults": "minor page faults"}
    header = ["threads", "state", "variant", "ms"] + [titles[k] for k in extra]
    lines = [f"### {section}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [str(row["threads"]), row["state"], row["variant"], f"{row['ms']:.2f}"]
        for key in extra:
            value = row.get(key)
            cells.append("-" if value is None else (f"{value:.1e}" if key == "rel" else str(value)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _sections(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown section(s) {', '.join(unknown) or '(none given)'}; choose from "
            f"{', '.join(SECTIONS)}"
        )
    return names


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=thread_settings, default=[1], help="e.g. 1,all")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per entry")
    parser.add_argument("--batch", type=int, default=64, help="batch size of the states")
    parser.add_argument(
        "--sections",
        type=_sections,
        default=[s for s in SECTIONS if s != "epilogue"],
        help=f"comma-separated, from {', '.join(SECTIONS)} (default: all but epilogue)",
    )
    parser.add_argument(
        "--compile", action="store_true", help="also run the epilogue section (torch.compile)"
    )
    args = parser.parse_args(argv)
    for name in ("repeats", "batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.compile and "epilogue" not in args.sections:
        args.sections.append("epilogue")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Run the chosen sections at each thread setting; print and return their rows."""
    args = parse_args(argv)
    print(
        f"CPU {cpu_model()}, {all_threads()} threads available; torch {torch.__version__}; "
        f"batch {args.batch}; median of {args.repeats} calls; channels-last states\n"
    )
    previous = torch.get_num_threads()
    results: dict[str, list[dict[str, Any]]] = {}
    try:
        for section in args.sections:
            rows = []
            for threads in args.threads:
                torch.set_num_threads(threads)
                rows += [
                    {"threads": threads, **r} for r in RUNNERS[section](args.batch, args.repeats)
                ]
            results[section] = rows
            print(format_table(section, rows) + "\n", flush=True)
    finally:
        torch.set_num_threads(previous)
    return results


if __name__ == "__main__":
    main()
