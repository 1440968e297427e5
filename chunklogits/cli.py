"""The main job: ``python -m chunklogits`` (or ``chunklogits bench``).

With no arguments and no downloads it builds a randomly initialised Llama-3-shaped model
(Llama-3.2-1B's shape: V = 128,256, D = 2048, 2 decoder layers), measures peak memory and time of
every ``benchmark.TASKS`` case at a few sequence lengths, prints the table with a progress bar
while it works, and writes ``report.md``, ``results.json`` and one PNG per task to ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from . import benchmark, memory, report
from ._blocks import _cpu_multiplies_natively
from .benchmark import PRESETS, SEED_SIZES, TASKS, Workload

DEFAULT_SIZES = (512, 1024, 2048)
DEFAULT_BATCHES = (1, 64, 256)
# The first command's measuring time, estimated: the estimate ran up to 1.25x short on a 2-core
# AVX2 CPU (docs/benchmarks.md, "The main job"), so with the start-up it finishes within 5 minutes.
DEFAULT_MINUTES = 3.5
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _int_list(low: int):
    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(part) for part in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated integers, got {text!r}"
            ) from None
        if not values or min(values) < low:
            raise argparse.ArgumentTypeError(f"expected integers >= {low}, got {text!r}")
        return values

    return parse


def _minutes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of minutes > 0, got {text!r}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _names(text: str) -> tuple[str, ...]:
    names = tuple(text.split(","))
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise argparse.ArgumentTypeError(f"expected names from {sorted(TASKS)}, got {unknown}")
    return names


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="chunklogits",
        description="Peak memory and time of a causal LM's last layer: transformers as at issue "
        "#30860, transformers 5.x, RL-trainer log-probs, and chunklogits, on the same model.",
    )
    p.add_argument("command", nargs="?", choices=["bench"], default="bench")
    p.add_argument(
        "--model",
        metavar="PATH",
        help="a local checkpoint directory, or a config.json (random weights); default: "
        "the built-in preset",
    )
    p.add_argument(
        "--preset", choices=sorted(PRESETS), help="default llama3-1b (llama3-8b with --full)"
    )
    p.add_argument(
        "--layers",
        type=_positive,
        help="decoder layers of a model built from a preset or config (default 2 for presets)",
    )
    p.add_argument(
        "--sizes",
        type=_int_list(2),
        help="tokens per sequence, comma-separated (default "
        f"{','.join(map(str, DEFAULT_SIZES))}, or halved until the estimate fits --minutes)",
    )
    p.add_argument(
        "--minutes",
        type=_minutes,
        default=DEFAULT_MINUTES,
        help="without --sizes or --full: the measuring time to fit the default sizes in, "
        "estimated from a GEMM's speed on this machine (default %(default)s)",
    )
    p.add_argument(
        "--batches",
        type=_int_list(1),
        default=DEFAULT_BATCHES,
        help="sequences per sampling step, comma-separated (default "
        f"{','.join(map(str, DEFAULT_BATCHES))})",
    )
    p.add_argument("--batch", type=_positive, default=1, help="sequences per forward (default 1)")
    p.add_argument(
        "--tasks",
        type=_names,
        default=tuple(TASKS),
        help=f"comma-separated subset of {','.join(TASKS)}",
    )
    p.add_argument(
        "--dtype",
        choices=["auto", *sorted(_DTYPES)],
        default="auto",
        help="the model's dtype; auto (default): bfloat16 on a GPU or on a CPU that multiplies "
        "bf16 natively (AVX512-BF16, AMX), float32 on other CPUs, where every bf16 GEMM of the "
        "baselines is 10 to 100 times slower than fp32",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--shards",
        type=_positive,
        help="vocabulary shards for chunklogits (default: from the block budget)",
    )
    p.add_argument(
        "--full",
        action="store_true",
        help="the seed issue's setting: Llama-3-8B's "
        "shape (D = 4096) and sequence lengths 100, 500, ..., 6500",
    )
    p.add_argument(
        "--out", default="chunklogits-report", help="output folder (default %(default)s)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    preset = None if args.model else args.preset or ("llama3-8b" if args.full else "llama3-1b")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    memory.pin_allocator()  # every case is timed under the same allocator (see memory.py)

    dtype, why = choose_dtype(args.dtype, args.device)
    print(f"dtype {dtype}: {why}", file=sys.stderr)
    header = report.machine()
    started = time.time()
    print(f"building {args.model or preset} ...", file=sys.stderr)
    try:
        model = benchmark.build_model(
            preset,
            path=args.model,
            layers=args.layers,
            dtype=_DTYPES[dtype],
            device=args.device,
        )
        workload = Workload(model, shards=args.shards)
        workload.check_head()
    except ValueError as error:
        parser().error(str(error))
    layers = model.config.num_hidden_layers
    header.update(
        {
            "model": args.model
            or f"{preset} (random weights, {layers} layer{'s' if layers > 1 else ''})",
            "vocab x hidden": f"{workload.vocab} x {workload.weight.shape[1]}",
            "dtype": f"{dtype} ({why})",
            "device": args.device,
            "parameters MiB": round(benchmark.parameter_bytes(model) / 2**20),
            "batch": args.batch,
            "command": " ".join(
                ["python -m chunklogits", *(sys.argv[1:] if argv is None else argv)]
            ),
        }
    )
    tasks = list(benchmark.iter_tasks(args.tasks))
    sizes, why = choose_sizes(workload, tasks, args)
    print(f"sizes {','.join(map(str, sizes))}: {why}", file=sys.stderr)
    header["sizes"] = f"{','.join(map(str, sizes))} tokens ({why})"
    results = _run(workload, tasks, sizes, args)
    header["load average at end"] = report.load_average()
    header["wall time s"] = round(time.time() - started)

    text = write_report(out, header, tasks, results)
    print(text)
    print(f"\nwritten to {out.resolve()}", file=sys.stderr)
    return 0


def choose_dtype(requested: str, device: str) -> tuple[str, str]:
    """The model dtype to measure in, and why: ``requested`` unless it is ``"auto"``."""
    if requested != "auto":
        return requested, "as requested"
    if torch.device(device).type != "cpu":
        return "bfloat16", f"auto: bf16 is the fast path on {device}"
    if _cpu_multiplies_natively(torch.bfloat16):
        return "bfloat16", "auto: this CPU multiplies bf16 natively (AVX512-BF16 or AMX)"
    return "float32", (
        "auto: this CPU has no native bf16 GEMM (no AVX512-BF16 or AMX), where every bf16 "
        "baseline runs 10 to 100 times slower than in fp32; --dtype bfloat16 measures it anyway"
    )


def choose_sizes(workload: Workload, tasks, args) -> tuple[tuple[int, ...], str]:
    """The sequence lengths to measure, and why: ``--sizes``, the seed issue's with ``--full``,
    else ``DEFAULT_SIZES`` halved until ``benchmark.estimate_seconds`` at this machine's GEMM
    speed fits ``--minutes`` (the smallest candidate, 1/8 of the defaults, if none does)."""
    if args.sizes:
        return args.sizes, "as requested"
    if args.full:
        return SEED_SIZES, "the seed issue's (--full)"
    rate = benchmark.gemm_flops_per_second(workload)

    def minutes(sizes):
        seconds = benchmark.estimate_seconds(
            workload, tasks, sizes, args.batches, batch=args.batch, flops_per_second=rate
        )
        return seconds / 60

    speed = f"{rate / 1e9:.0f} GFLOP/s in {workload.weight.dtype} GEMMs here"
    for halvings in range(4):
        sizes = tuple(max(2, size >> halvings) for size in DEFAULT_SIZES)
        estimate = minutes(sizes)
        if estimate <= args.minutes or halvings == 3:
            break
    why = f"about {estimate:.1f} min estimated at {speed}"
    if sizes != DEFAULT_SIZES:
        default = ",".join(map(str, DEFAULT_SIZES))
        why += f"; {default} would take about {minutes(DEFAULT_SIZES):.0f} min"
    return sizes, f"{why} (--minutes {args.minutes:g}; --sizes sets them)"


def _run(workload: Workload, tasks, sizes, args) -> list[benchmark.Result]:
    from tqdm import tqdm

    total = benchmark.count_steps(tasks, sizes, args.batches)
    results = []
    with tqdm(total=total, file=sys.stderr, dynamic_ncols=True) as bar:

        def step(description: str) -> None:
            if bar.desc:  # the previous step is done
                bar.update(1)
            bar.set_description_str(description)

        for task in tasks:
            task_sizes = args.batches if task.name == "sampling" else sizes
            results += benchmark.run_task(
                workload, task, task_sizes, batch=args.batch, on_step=step
            )
        bar.update(total - bar.n)
    return results


def write_report(out: Path, header: dict, tasks, results) -> str:
    """Write ``results.json``, one PNG per task (when matplotlib is installed) and
    ``report.md``; return the markdown."""
    report.save_json(out / "results.json", header, results)
    try:
        import matplotlib  # noqa: F401

        figures = True
    except ImportError:
        figures = False
        print("matplotlib is not installed: no figures (pip install matplotlib)", file=sys.stderr)
    lines = ["# chunklogits benchmark", ""]
    lines += [f"- {key}: {value}" for key, value in header.items()]
    for task in tasks:
        lines += ["", f"## {task.title}", "", report.markdown_table(task, results)]
        if figures:
            name = f"{task.name}.png"
            report.figure(task, [(header["model"], results)], out / name)
            lines += ["", f"![{task.name}]({name})"]
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    return text
