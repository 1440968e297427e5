"""The figures of transformers issue #30860 ("Improving memory efficiency further"), reproduced
and extended: peak memory against sequence length (100, 500, ..., 6500 tokens) and its ratio to
chunklogits' peak, for Llama-3 (V = 128,256), Mistral (V = 32,000) and Gemma (V = 256,000)
shapes, at inference prefill (the issue's measurement: fp32 logits as transformers 4.40 returned
them, half logits as 5.x returns them, ``logits_to_keep=1`` as ``generate()`` asks, and
chunklogits) and for a training step (forward, loss, backward). Real hidden sizes, one decoder
layer, random weights (``chunklogits.benchmark.PRESETS``).

    python -m bench.seed_figures --out docs/figures            # everything (hours on a CPU)
    python -m bench.seed_figures --out docs/figures --shapes llama3-8b --tasks loss \
        --sizes 100,1000,2000,3500,5000,6500                    # a coarse grid first

Results accumulate in ``OUT/seed_results.json``, one entry per run of a (shape, task) pair with
the machine and its load: a rerun measures only the sizes a pair does not have yet (``--fresh``
forgets the pair's earlier results), so the sweep can be run piecewise, e.g. on a coarse grid first.
``OUT/seed_prefill.png``, ``OUT/seed_loss.png`` and ``OUT/seed.md`` are rewritten from that
file after every run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from chunklogits import benchmark, memory, report
from chunklogits.benchmark import SEED_SIZES, TASKS, Result

SHAPES = ("llama3-8b", "mistral-7b", "gemma-7b")
HEADLINE_TOKENS = 6500
# Machine facts stated once at the top of seed.md; the load and wall time go with each pair.
_MACHINE = ("cpu", "cpu cores", "torch threads", "gpu", "python", "torch", "transformers")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="docs/figures")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--tasks", default="prefill,loss")
    p.add_argument("--sizes", default=",".join(map(str, SEED_SIZES)))
    p.add_argument("--device", default="cpu")
    p.add_argument("--fresh", action="store_true", help="forget these pairs' earlier results")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "seed_results.json"
    runs = json.loads(store.read_text()) if store.exists() else []
    sizes = [int(s) for s in args.sizes.split(",")]
    memory.pin_allocator()
    for shape in args.shapes.split(","):
        if args.fresh:
            tasks = args.tasks.split(",")
            runs = [r for r in runs if r["shape"] != shape or r["task"] not in tasks]
        todo = {}
        for name in args.tasks.split(","):
            done = {r.size for r in _results(runs, shape, name)}
            todo[name] = [size for size in sizes if size not in done]
        if not any(todo.values()):
            continue
        model = benchmark.build_model(shape, layers=1, device=args.device)
        workload = benchmark.Workload(model)
        for task in benchmark.iter_tasks(name for name, missing in todo.items() if missing):
            print(f"{shape}: {task.name} {todo[task.name]} ...", file=sys.stderr, flush=True)
            machine, started = report.machine(), time.time()
            results = benchmark.run_task(
                workload,
                task,
                todo[task.name],
                on_step=lambda d: print(f"  {d}", file=sys.stderr, flush=True),
            )
            machine["load average at end"] = report.load_average()
            machine["wall time s"] = round(time.time() - started)
            run = {"shape": shape, "task": task.name, "sizes": todo[task.name]}
            runs.append({**run, "machine": machine, "results": [asdict(r) for r in results]})
            store.write_text(json.dumps(runs, indent=1))
            write_outputs(out, runs)
        del model, workload
    write_outputs(out, runs)
    return 0


def _runs(runs, shape: str, task: str) -> list[dict]:
    return [r for r in runs if r["shape"] == shape and r["task"] == task]


def _results(runs, shape: str, task: str) -> list[Result]:
    """Every result of the pair, a later run's replacing an earlier one's for the same case and
    size; sorted by case (in the task's order) and size."""
    merged = {}
    for run in _runs(runs, shape, task):
        for r in run["results"]:
            merged[r["case"], r["size"]] = Result(**r)
    order = [c.name for c in TASKS[task].cases]
    return sorted(merged.values(), key=lambda r: (order.index(r.case), r.size))


def headline(runs, task: str) -> list[str]:
    """Llama-3 shape at ``HEADLINE_TOKENS``: each implementation's peak and its ratio to ours."""
    results = [r for r in _results(runs, "llama3-8b", task) if r.size == HEADLINE_TOKENS]
    if not results:
        return []
    lines = [
        f"| Llama-3-8B shape, {HEADLINE_TOKENS} tokens | peak GiB | × chunklogits |",
        "|---|--:|--:|",
    ]
    for r in results:
        if r.peak_bytes is None:
            lines.append(f"| {r.case} | {r.skipped} | |")
            continue
        ratio = report.peak_ratio(results, r)
        shown = "—" if ratio is None else f"{ratio:.2f}"
        lines.append(f"| {r.case} | {r.peak_bytes / 2**30:.2f} | {shown} |")
    return lines


def write_outputs(out: Path, runs) -> None:
    """The figures and ``seed.md`` from every run recorded so far."""
    lines = ["# The issue-#30860 figures, reproduced", ""]
    if runs:
        machine = runs[0]["machine"]
        lines += [", ".join(f"{k}: {v}" for k, v in machine.items() if k in _MACHINE) + ".", ""]
    for task_name in ("prefill", "loss"):
        task = TASKS[task_name]
        shapes = [s for s in SHAPES if _results(runs, s, task_name)]
        if not shapes:
            continue
        panels = [
            (f"{s} (V = {benchmark.PRESETS[s].vocab_size:,})", _results(runs, s, task_name))
            for s in shapes
        ]
        name = f"seed_{task_name}.png"
        report.figure(task, panels, out / name)
        lines += [f"## {task.title}", "", f"![{task_name}]({name})", ""]
        lines += [*headline(runs, task_name), ""]
        for shape in shapes:
            lines += [f"### {shape}", ""]
            for run in _runs(runs, shape, task_name):
                sizes = run.get("sizes") or sorted({r["size"] for r in run["results"]})
                load = ", ".join(
                    f"{k}: {v}" for k, v in run["machine"].items() if k not in _MACHINE
                )
                lines += [f"- {', '.join(map(str, sizes))} tokens: {load}."]
            lines += [""]
            lines += [report.markdown_table(task, _results(runs, shape, task_name)), ""]
    (out / "seed.md").write_text("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
