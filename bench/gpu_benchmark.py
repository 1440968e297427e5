"""The GPU benchmark: the fused linear cross-entropy, forward + backward, on one GPU.

For each shape (``cce-table1``: 8192 x 2304, V = 256,000, the shape of Table 1 of Cut
Cross-Entropy, Wijmans et al. 2024; ``llama3``: 8192 x 4096, V = 128,256), in bf16, it measures
every implementation the same way and writes one markdown table per shape:

* time of ``loss = f(hidden, weight, labels); loss.backward()`` (mean reduction, gradients of
  hidden and weight): median of ``--repeats`` runs timed with CUDA events after ``--warmup``;
* peak memory (``chunklogits.memory.peak``: the CUDA allocator's peak above the entry level,
  where hidden, weight and labels already exist), and the ratio of inputs + that peak to the
  lower bound inputs + gradients;
* accuracy of the loss and both gradients against fp64 ground truth with the rule of
  tests/helpers.py (``|exact - ours| <= |exact - naive bf16| + slack``, elementwise).

Implementations: chunklogits with its Triton kernels (exact, and with the opt-in gradient filter),
chunklogits' PyTorch block loop, the naive materialising loss (``chunklogits.reference``), the
same under ``torch.compile``, PyTorch's own ``F.linear_cross_entropy`` where it exists,
cut-cross-entropy (``impl="cce"``, its default gradient filter) and
Liger's fused linear cross-entropy. One that cannot run is listed with the reason.

Data (``--data``): ``zipf`` (default) gives a trained model's kind of softmax, which decides how
much any gradient filter can skip: logits are a Zipf(1.1) log-prior over a shuffled vocabulary
(carried by one hidden coordinate held at 1), plus 8 for the label, which is drawn from that
prior, plus noise of variance ``1 + 64 / (D - 1)``. At both shapes that gives a loss of about
1.7 nats and ~140 entries per row with p >= 2^-12 (measured on 256 rows in fp32 on CPU).
``random`` gives i.i.d. normal hidden and weight (a near-uniform softmax).

On the GPU machine (no network; its image has torch and triton) the two competitors travel as
their pure-Python wheels (the device tool's README): here, ``echo /.whl/ >> .git/info/exclude``
and ``pip download --no-deps -d .whl cut-cross-entropy==25.1.1 liger-kernel==0.8.5``; there,
with ``.whl`` carried::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site python3 bench/gpu_benchmark.py --out $OUT/benchmarks.md

The first run of each implementation compiles (Triton, ``torch.compile``) and autotunes (CCE);
``--shapes`` and ``--impls`` split the work across calls if one would run too long.

Without a GPU, ``--dry-run`` runs the same code on tiny shapes on CPU (Triton kernels in the
interpreter): a check of the script, not a measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Shape:
    rows: int
    dim: int
    vocab: int


SHAPES = {
    "cce-table1": Shape(8192, 2304, 256_000),
    "llama3": Shape(8192, 4096, 128_256),
}
DRY_RUN_SHAPE = Shape(67, 123, 507)
IMPLEMENTATIONS = (
    "chunklogits-triton",
    "chunklogits-triton-filter",
    "chunklogits-torch",
    "naive",
    "naive-compiled",
    "torch-linear-cross-entropy",
    "cce",
    "liger",
)
MiB = 2**20


class Unavailable(Exception):
    """An implementation that cannot run here; the message says why."""


@dataclass
class Result:
    implementation: str
    milliseconds: float | None = None
    peak_bytes: int | None = None
    lower_bound_ratio: float | None = None
    loss: float | None = None
    accuracy: str = ""
    skipped: str = ""  # why it has no numbers: "skipped: <reason>" or "FAILED <error>"


@dataclass
class Report:
    shape_name: str
    shape: Shape
    dtype: str
    data: str
    device: str
    input_bytes: int
    grad_bytes: int
    results: list[Result] = field(default_factory=list)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=sorted(SHAPES))
    parser.add_argument(
        "--impls", nargs="+", choices=IMPLEMENTATIONS, default=list(IMPLEMENTATIONS)
    )
    parser.add_argument("--data", choices=("zipf", "random"), default="zipf")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs first (compilation)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the markdown here (else stdout only)")
    parser.add_argument(
        "--dry-run", action="store_true",
        help=f"tiny shape {DRY_RUN_SHAPE} on CPU, Triton kernels interpreted: checks the script",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        parser.error(f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats}, {args.warmup}")
    return args


# ----------------------------------------------------------------------------------------------
# inputs


def make_inputs(shape: Shape, data: str, dtype, device, seed: int):
    """hidden ``[rows, dim]``, weight ``[vocab, dim]`` (``dtype``), labels ``[rows]`` (see the
    module docstring for ``data``)."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    n, d, v = shape.rows, shape.dim, shape.vocab
    if data == "random":
        hidden = torch.randn(n, d, generator=g)
        weight = torch.randn(v, d, generator=g) / math.sqrt(d)
        labels = torch.randint(0, v, (n,), generator=g)
    else:
        ranks = torch.randperm(v, generator=g).double() + 1
        log_prior = -1.1 * ranks.log()
        labels = torch.multinomial((log_prior - log_prior.max()).exp(), n, True, generator=g)
        directions = torch.randn(v, d - 1, generator=g) / math.sqrt(d - 1)
        weight = torch.cat([log_prior.float()[:, None], directions], 1)
        noise = torch.randn(n, d - 1, generator=g)
        hidden = torch.cat([torch.ones(n, 1), 8.0 * directions[labels] + noise], 1)
    return hidden.to(device, dtype), weight.to(device, dtype), labels.to(device)


# ----------------------------------------------------------------------------------------------
# implementations: each is (loss function, context manager held around forward and backward)


def implementation(name: str, device) -> tuple[Callable, Callable]:
    import torch

    import chunklogits as cl
    from chunklogits import _blocks, reference

    if name == "naive":
        return reference.linear_cross_entropy, contextlib.nullcontext
    if name == "naive-compiled":
        return torch.compile(reference.linear_cross_entropy), contextlib.nullcontext
    if name == "torch-linear-cross-entropy":
        fused = getattr(torch.nn.functional, "linear_cross_entropy", None)
        if fused is None:
            raise Unavailable(f"torch {torch.__version__} has no F.linear_cross_entropy")
        return fused, contextlib.nullcontext
    if name.startswith("chunklogits"):
        kernels = _triton_module() if name != "chunklogits-torch" else None
        if name != "chunklogits-torch" and kernels is None:
            raise Unavailable("triton is not installed")
        if kernels is not None and device.type == "cpu" and not _interpreted(kernels):
            raise Unavailable("no GPU, and the kernels were not loaded in Triton's interpreter")
        probe = torch.empty(1, 1, dtype=torch.bfloat16, device=device)
        if kernels is not None and device.type == "cuda" and not kernels.serves(probe):
            raise Unavailable("the Triton kernels do not serve this GPU / triton version")

        @contextlib.contextmanager
        def settings():
            functions = _blocks._block_functions
            previous = (
                (kernels.enable(True), kernels.set_gradient_filter(None)) if kernels else None
            )
            if name == "chunklogits-triton-filter":
                kernels.set_gradient_filter("auto")
            if name == "chunklogits-torch" and kernels is not None:
                kernels.enable(False)
            if kernels is not None and device.type == "cpu" and name != "chunklogits-torch":
                # The dispatch serves CUDA tensors only; route the dry run's CPU tensors through
                # the (interpreted) kernels as the tests do.
                _blocks._block_functions = lambda *_: (
                    kernels.forward_stats,
                    kernels.backward_blocks,
                )
            try:
                yield
            finally:
                _blocks._block_functions = functions
                if previous is not None:
                    kernels.enable(previous[0])
                    kernels.set_gradient_filter(previous[1])

        return cl.linear_cross_entropy, settings
    if device.type != "cuda":
        raise Unavailable("needs a CUDA GPU")
    if name == "cce":
        try:
            from cut_cross_entropy import linear_cross_entropy
        except Exception as error:  # a broken install must not stop the other measurements
            raise Unavailable(f"cut-cross-entropy is not importable ({error!r})") from error
        return (lambda h, w, y: linear_cross_entropy(h, w, y, impl="cce")), contextlib.nullcontext
    if name == "liger":
        try:
            from liger_kernel.transformers.fused_linear_cross_entropy import (
                LigerFusedLinearCrossEntropyLoss,
            )
        except Exception as error:
            raise Unavailable(f"liger-kernel is not importable ({error!r})") from error
        liger = LigerFusedLinearCrossEntropyLoss()
        return (lambda h, w, y: liger(w, h, y)), contextlib.nullcontext
    raise ValueError(f"implementation: expected one of {IMPLEMENTATIONS}, got {name!r}")


def _triton_module():
    try:
        from chunklogits import _triton
    except ImportError:
        return None
    return _triton


def _interpreted(kernels) -> bool:
    return type(kernels._stats_kernel).__name__ == "InterpretedFunction"


# ----------------------------------------------------------------------------------------------
# measurements


def run_once(loss_fn, context, hidden, weight, labels):
    """Forward and backward; returns (loss, grad hidden, grad weight) and leaves no gradient on
    the inputs, so that the next run starts from the same memory."""
    with context():
        loss = loss_fn(hidden, weight, labels)
        loss.backward()
    grads = hidden.grad, weight.grad
    hidden.grad = weight.grad = None
    return (loss.detach(), *grads)


def time_ms(fn: Callable[[], object], device, warmup: int, repeats: int) -> float:
    """Median milliseconds of ``fn`` (CUDA events on a GPU, the host clock on CPU)."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(stop))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def exact_results(hidden, weight, labels, chunk_rows: int = 512):
    """fp64 loss and gradients of the mean cross-entropy, computed ``chunk_rows`` rows at a time
    with ``chunklogits.reference`` (so that the fp64 logits never exceed a chunk)."""
    import torch

    from chunklogits import reference

    weight64 = weight.detach().double().requires_grad_()
    hidden_grad = torch.empty_like(hidden, dtype=torch.float64)
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    for r0 in range(0, hidden.shape[0], chunk_rows):
        rows = hidden[r0 : r0 + chunk_rows].detach().double().requires_grad_()
        loss = reference.linear_cross_entropy(
            rows, weight64, labels[r0 : r0 + chunk_rows], reduction="sum"
        )
        (loss / hidden.shape[0]).backward()
        total += loss.detach()
        hidden_grad[r0 : r0 + chunk_rows] = rows.grad
    return total / hidden.shape[0], hidden_grad, weight64.grad


def accuracy(ours, naive, exact, dtype) -> str:
    """``ok`` if loss and gradients meet the oracle rule, else the first violation."""
    sys.path.insert(0, str(ROOT))
    from tests.helpers import assert_as_accurate

    for what, o, n, e in zip(
        ("loss", "grad hidden", "grad weight"), ours, naive, exact, strict=True
    ):
        try:
            assert_as_accurate(o, n, e, dtype, what)
        except AssertionError as error:
            return f"FAIL {error}".replace("|", "\\|").replace("\n", " ")
    return "ok"


def benchmark_shape(shape_name: str, shape: Shape, args, device) -> Report:
    import torch

    from chunklogits import reference

    hidden, weight, labels = make_inputs(shape, args.data, torch.bfloat16, device, args.seed)
    hidden.requires_grad_()
    weight.requires_grad_()
    input_bytes = sum(t.numel() * t.element_size() for t in (hidden, weight, labels))
    grad_bytes = sum(t.numel() * t.element_size() for t in (hidden, weight))
    report = Report(shape_name, shape, "bf16", args.data, describe(device), input_bytes, grad_bytes)
    exact = exact_results(hidden, weight, labels)
    naive = run_once(reference.linear_cross_entropy, contextlib.nullcontext, hidden, weight, labels)
    for name in args.impls:
        try:
            loss_fn, context = implementation(name, device)
        except Unavailable as reason:
            report.results.append(Result(name, skipped=f"skipped: {reason}"))
            continue
        run = functools.partial(run_once, loss_fn, context, hidden, weight, labels)
        try:
            report.results.append(measure(name, run, naive, exact, report, args, device))
        except Exception as error:  # recorded in the table; the other implementations still run
            report.results.append(Result(name, skipped=f"FAILED {error!r}"[:300]))
            hidden.grad = weight.grad = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return report


def measure(name: str, run: Callable, naive, exact, report: Report, args, device) -> Result:
    """Accuracy, time and peak memory of one implementation's forward + backward ``run``."""
    import torch

    from chunklogits import memory

    ours = run()  # the first run also compiles and autotunes
    result = Result(
        name, loss=float(ours[0]), accuracy=accuracy(ours, naive, exact, torch.bfloat16)
    )
    del ours
    result.milliseconds = time_ms(run, device, args.warmup, args.repeats)
    with memory.peak(device) as peak:
        run()
    result.peak_bytes = peak.bytes
    result.lower_bound_ratio = (report.input_bytes + peak.bytes) / (
        report.input_bytes + report.grad_bytes
    )
    return result


def describe(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()})"


# ----------------------------------------------------------------------------------------------
# report


def format_report(report: Report) -> str:
    s = report.shape
    lines = [
        f"### {report.shape_name}: {s.rows} x {s.dim}, V = {s.vocab:,}, {report.dtype}, "
        f"data {report.data}, {report.device}",
        "",
        f"Lower bound (inputs + gradients): {(report.input_bytes + report.grad_bytes) / MiB:,.1f}"
        f" MiB, of which gradients {report.grad_bytes / MiB:,.1f} MiB.",
        "",
        "| implementation | fwd+bwd ms | peak above inputs MiB | peak / lower bound | loss "
        "| accuracy |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in report.results:
        if r.skipped:
            lines.append(f"| {r.implementation} | {r.skipped} | | | | |")
            continue
        lines.append(
            f"| {r.implementation} | {r.milliseconds:.2f} | {r.peak_bytes / MiB:,.1f} | "
            f"{r.lower_bound_ratio:.3f} | {r.loss:.5f} | {r.accuracy} |"
        )
    lines += ["", *verdict(report), ""]
    return "\n".join(lines)


def verdict(report: Report) -> list[str]:
    """The GPU targets for chunklogits' exact Triton path (time at most cut-cross-entropy's,
    peak at most 1.05x the lower bound), as measured in this run."""
    by_name = {r.implementation: r for r in report.results if not r.skipped}
    ours = by_name.get("chunklogits-triton")
    if ours is None:
        return ["chunklogits-triton did not run: no verdict."]
    lines = []
    for rival, relation in (("cce", "<="), ("liger", "<")):
        other = by_name.get(rival)
        if other is None:
            lines.append(f"- time vs {rival}: not measured ({rival} did not run)")
            continue
        met = (
            ours.milliseconds <= other.milliseconds
            if relation == "<="
            else ours.milliseconds < other.milliseconds
        )
        lines.append(
            f"- time {relation} {rival}: {ours.milliseconds:.2f} vs {other.milliseconds:.2f} ms "
            f"(ratio {ours.milliseconds / other.milliseconds:.3f}): {'met' if met else 'NOT met'}"
        )
    met = ours.lower_bound_ratio <= 1.05
    lines.append(f"- peak within 5% of the lower bound: {ours.lower_bound_ratio:.3f}: {_met(met)}")
    lines.append(f"- accuracy (oracle rule): {ours.accuracy}")
    return lines


def _met(met: bool) -> str:
    return "met" if met else "NOT met"


def header(args, argv: list[str], device) -> str:
    import torch

    versions = [f"torch {torch.__version__}"]
    kernels = _triton_module()
    if kernels is not None:
        import triton

        versions.append(f"triton {triton.__version__}")
    command = " ".join(["python", "bench/gpu_benchmark.py", *argv])
    note = " DRY RUN on CPU: not a measurement." if args.dry_run else ""
    return (
        f"## Fused linear cross-entropy, forward + backward ({describe(device)}, "
        f"{', '.join(versions)}, {datetime.date.today().isoformat()}){note}\n\n"
        f"Command: `{command}`. Median of {args.repeats} runs after {args.warmup} warm-up runs.\n"
    )


def main(argv: list[str] | None = None) -> str:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.dry_run:
        # Must precede the first import of chunklogits._triton, whose kernels it turns into
        # interpreted functions.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.path.insert(0, str(ROOT))
    import torch

    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: run with --dry-run to check the script on CPU")
    shapes = {"dry-run": DRY_RUN_SHAPE} if args.dry_run else {k: SHAPES[k] for k in args.shapes}
    sections = [header(args, argv, device)]
    for name, shape in shapes.items():
        sections.append(format_report(benchmark_shape(name, shape, args, device)))
        print(sections[-1], flush=True)
    text = "\n".join(sections)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return text


if __name__ == "__main__":
    main()
