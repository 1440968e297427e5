"""Where one loss forward + backward spends its time: a ``torch.profiler`` trace of
``chunklogits.linear_cross_entropy`` on a ``bench.common.HEAD_SHAPES`` head (bf16 inputs), its
self CPU time summed by kind of op, beside the three-GEMM floor of ``test_bench_loss.py``.

    python -m bench.profile_loss llama3-head-1k-x-256 [--grad-in-forward] [--compile]

Prints seconds per kind: the block GEMMs (``mm``/``addmm``), the elementwise passes over the
blocks, the dtype conversions (``copy_``/``to``) and the rest; a profile, not a benchmark: the
profiler adds a little time to every op. Then the time besides the GEMMs per logit of the head
(target: 1 ns), and the CPU's instruction set, which decides what each kind costs.
``--compile``: with ``set_block_compile(True)`` ("compiled block passes"; the warm-up step
compiles them, its time is printed).
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

from torch.profiler import ProfilerActivity, profile

import chunklogits as cl
from bench.common import HEAD_SHAPES, head_inputs, instruction_set
from chunklogits._blocks import block_compute_dtype

_KINDS = {
    "GEMMs": ("aten::mm", "aten::addmm", "aten::addmm_"),
    "conversions and copies": ("aten::copy_", "aten::to", "aten::_to_copy"),
}


def _kind(name: str) -> str:
    if name.startswith("## Call CompiledFxGraph"):
        return "compiled block passes"
    for kind, names in _KINDS.items():
        if name in names:
            return kind
    return "elementwise and reductions" if name.startswith("aten::") else "other"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("shape", choices=sorted(HEAD_SHAPES))
    p.add_argument("--grad-in-forward", action="store_true")
    p.add_argument("--compile", action="store_true", help="set_block_compile(True)")
    args = p.parse_args()
    cl.set_block_compile(args.compile)
    hidden, weight, labels = head_inputs(args.shape)
    dtype = block_compute_dtype(hidden.dtype, hidden.device)
    h, w = hidden.detach().to(dtype), weight.detach().to(dtype)

    def floor():
        logits = h @ w.T
        return logits @ w, logits.T @ h

    def step():
        hidden.grad = weight.grad = None
        loss = cl.linear_cross_entropy(
            hidden, weight, labels, grad_in_forward=args.grad_in_forward or None
        )
        loss.backward()

    floor()  # warm-up
    start = time.perf_counter()
    step()
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    floor()
    floor_s = time.perf_counter() - start
    with profile(activities=[ProfilerActivity.CPU]) as trace:
        start = time.perf_counter()
        step()
        step_s = time.perf_counter() - start
    seconds = defaultdict(float)
    for event in trace.key_averages():
        seconds[_kind(event.key)] += event.self_cpu_time_total / 1e6
    print(f"{args.shape}, {dtype} GEMMs, cpu: {instruction_set()}")
    print(f"floor (3 whole-matrix GEMMs): {floor_s:.2f} s; profiled step: {step_s:.2f} s")
    print(f"warm-up step (compiles with --compile): {warmup_s:.2f} s")
    for kind, total in sorted(seconds.items(), key=lambda item: -item[1]):
        print(f"  {kind:28s} {total:6.2f} s  ({total / floor_s:.2f}x floor)")
    # Self CPU time summed over the ops (per op, not per thread), per logit of the N x V head.
    besides = sum(total for kind, total in seconds.items() if kind != "GEMMs")
    n, _, v = HEAD_SHAPES[args.shape]
    print(f"besides the GEMMs: {besides * 1e9 / (n * v):.2f} ns per logit (forward + backward)")


if __name__ == "__main__":
    main()
