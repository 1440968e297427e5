"""Model-level cases of the main job under pytest-benchmark: prefill, per-token log-probs, a
training step and a sampling step on a randomly initialised Llama-3.2-1B-shaped model (real
hidden size 2048, V = 128,256, one decoder layer), every implementation in one run.

    pytest bench/test_bench_model.py --benchmark-only --benchmark-json=out/model.json

Each case records ``peak_mib`` (peak above the entry level, what it returns included) and its
answer's summary (``value``: next token, mean log-prob or loss) in ``extra_info``.
"""

from __future__ import annotations

import pytest
import torch

from bench.common import measure
from chunklogits import benchmark as workloads

TOKENS = 2048
SEQUENCES = 64  # sampling: one decoding step for this many sequences
_workload: list[workloads.Workload] = []


def workload() -> workloads.Workload:
    if not _workload:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = workloads.build_model("llama3-1b", layers=1, device=device)
        _workload.append(workloads.Workload(model))
    return _workload[0]


CASES = [(task, case) for task in workloads.TASKS.values() for case in task.cases]


@pytest.mark.parametrize("task, case", CASES, ids=[f"{t.name}-{c.name}" for t, c in CASES])
def test_model_case(benchmark, task, case):
    w = workload()
    size = SEQUENCES if task.name == "sampling" else TOKENS
    inputs = workloads.task_inputs(w, task, size, batch=1)
    answers = []

    def run():
        with torch.set_grad_enabled(task.grad):
            answers.append(case.run(w, *inputs).detach())

    benchmark.group = f"{task.name} ({size} {task.size_label})"
    measure(benchmark, run, reset=lambda: w.model.zero_grad(set_to_none=True), rounds=2)
    benchmark.extra_info["value"] = workloads.summary_value(task, answers[-1])
