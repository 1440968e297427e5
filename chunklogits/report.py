"""Tables, figures and a description of the machine for ``benchmark`` results (the main job and
``bench/seed_figures.py``). Figures need matplotlib (``pip install 'chunklogits[bench]'``)."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from .benchmark import TASKS, Result, Task

OURS = "chunklogits"


def _fmt(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _ours(results: Sequence[Result], task: Task, size: int) -> Result | None:
    for r in results:
        if r.task == task.name and r.case == OURS and r.size == size and r.peak_bytes:
            return r
    return None


def peak_ratio(results: Sequence[Result], r: Result) -> float | None:
    """``r``'s peak over chunklogits' peak for the same task and size (None when either is
    missing)."""
    ours = _ours(results, TASKS[r.task], r.size)
    if ours is None or r.peak_bytes is None:
        return None
    return r.peak_bytes / ours.peak_bytes


def markdown_table(task: Task, results: Sequence[Result]) -> str:
    """One row per case and size: peak MiB, its ratio to chunklogits', time, the answer's summary
    value and its largest difference from the first (most precise) case."""
    rows = [r for r in results if r.task == task.name]
    value = task.value_label or "value"
    lines = [
        f"| implementation | {task.size_label} | peak MiB | × chunklogits | time s | {value} "
        f"| max abs diff vs first row |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        if r.skipped:
            lines.append(f"| {r.case} | {r.size} | {r.skipped} | | | | |")
            continue
        ratio = peak_ratio(results, r)
        digits = 0 if task.name == "prefill" else 4
        lines.append(
            f"| {r.case} | {r.size} | {_fmt(r.peak_mib, 1)} | "
            f"{'—' if ratio is None else f'{ratio:.2f}'} | {_fmt(r.seconds, 2)} | "
            f"{_fmt(r.value, digits)} | {'—' if r.max_diff is None else f'{r.max_diff:.2g}'} |"
        )
    return "\n".join(lines)


def figure(
    task: Task,
    panels: Sequence[tuple[str, Sequence[Result]]],
    path: str | os.PathLike,
    *,
    with_time: bool = True,
) -> None:
    """Per ``(title, results)`` panel: peak memory against size, each baseline's peak over
    chunklogits' (the seed issue's ratio plot) and, optionally, time. Panels are columns and
    metrics rows; a single panel is laid out as one row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ["memory", "ratio", "time"] if with_time else ["memory", "ratio"]
    single = len(panels) == 1
    shape = (1, len(metrics)) if single else (len(metrics), len(panels))
    fig, grid = plt.subplots(*shape, figsize=(5 * shape[1], 3.6 * shape[0]), squeeze=False)

    def axes(metric: str, column: int):
        row = metrics.index(metric)
        return grid[0][row] if single else grid[row][column]

    for column, (title, results) in enumerate(panels):
        measured = [r for r in results if r.task == task.name and r.peak_bytes is not None]
        for case in task.cases:
            points = [r for r in measured if r.case == case.name]
            if not points:
                continue
            sizes = [r.size for r in points]
            style = dict(marker="o", markersize=3, label=case.name)
            if case.name == OURS:
                # dashed: logits_to_keep=1's prefill curve coincides with ours and stays visible
                style.update(color="black", linewidth=2, linestyle="--")
            axes("memory", column).plot(sizes, [r.peak_bytes / 2**30 for r in points], **style)
            if with_time:
                axes("time", column).plot(sizes, [r.seconds for r in points], **style)
            ratios = [(r.size, peak_ratio(results, r)) for r in points if case.name != OURS]
            ratios = [(size, q) for size, q in ratios if q is not None]
            if ratios:
                axes("ratio", column).plot(*zip(*ratios, strict=True), **style)
        labels = {
            "memory": "peak memory (GiB)",
            "ratio": "peak / chunklogits' peak",
            "time": "time (s)",
        }
        for metric in metrics:
            ax = axes(metric, column)
            ax.set(xlabel=task.size_label, ylabel=labels[metric])
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
        axes("ratio", column).axhline(1.0, color="grey", linewidth=0.8)
        axes("memory", column).set_title(title, fontsize=10)
    if axes("memory", 0).get_legend_handles_labels()[0]:  # nothing measured: no legend
        axes("memory", 0).legend(fontsize=7)
    fig.suptitle(task.title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine() -> dict[str, object]:
    """What the numbers were measured on, including the load (other processes slow the timings;
    they do not change the peak memory, which is this process's own)."""
    info: dict[str, object] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch threads": torch.get_num_threads(),
        "cpu": _cpu_name(),
        "cpu cores": os.cpu_count(),
        "load average at start (1, 5, 15 min)": load_average(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def load_average() -> str:
    """The machine's 1, 5 and 15 minute load averages: above the core count, other processes
    share the cores and timings are slower than on a quiet machine."""
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def save_json(path: str | os.PathLike, header: dict, results: Sequence[Result]) -> None:
    Path(path).write_text(
        json.dumps({"header": header, "results": [asdict(r) for r in results]}, indent=1)
    )


def load_json(path: str | os.PathLike) -> tuple[dict, list[Result]]:
    data = json.loads(Path(path).read_text())
    return data["header"], [Result(**r) for r in data["results"]]
