"""Compile the kernel launches of chunklogits._triton for a GPU without one: ``python -m
tests.triton_compile 90`` (compute capability; several may follow) prints one JSON line per
kernel and set of constexpr switches: its shared memory, whether its loads are software-pipelined
(``cp.async``) and whether it uses Hopper's ``wgmma``.

The launches are those of one forward pass and two backward passes (exact and filtered) over
small CPU tensors with the CUDA tile configurations; instead of running, each launch is
specialised the way Triton's launcher does it (``JITFunction.run``: argument types, 16-byte
alignment, integers equal to 1 or divisible by 16) and compiled to a cubin by the ptxas shipped
with triton. Needs ``TRITON_INTERPRET`` unset. Used by tests/test_triton.py.
"""

from __future__ import annotations

import json
import sys

import torch
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile, make_backend
from triton.runtime.jit import create_function_from_signature

from chunklogits import _triton
from chunklogits._blocks import LogitTransform, _GradCoefficients, plan_blocks


def record_launches() -> list[tuple[object, tuple, dict]]:
    """``(kernel, args, kwargs)`` of the launches of a forward and two backward passes."""
    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.kernel, args, kwargs))

    kernels = ("_stats_kernel", "_grad_logits_kernel", "_matmul_kernel")
    saved = {name: getattr(_triton, name) for name in kernels} | {"_config": _triton._config}
    for name in kernels:
        setattr(_triton, name, Recorder(saved[name]))
    _triton._config = lambda t: _triton._CONFIGS[("cuda", 4 if t.dtype == torch.float32 else 2)]
    try:
        rows, vocab, dim = 300, 1000, 256
        hidden = torch.randn(rows, dim, dtype=torch.bfloat16)
        weight = torch.randn(vocab, dim, dtype=torch.bfloat16)
        bias = torch.randn(vocab, dtype=torch.bfloat16)
        targets, index = torch.randint(0, vocab, (rows,)), torch.arange(rows)
        transform = LogitTransform(logit_scale=0.5, softcap=30.0, temperature=2.0)
        plan = plan_blocks(rows, vocab, hidden.dtype, hidden.device, shards=12, chunk_size=200)
        _triton.forward_stats(hidden, weight, bias, index, targets, transform, plan, True, True)
        ones = torch.ones(rows)
        needs = (True, True, True)
        every_term = _GradCoefficients(ones, ones, ones, ones)
        _triton.backward_blocks(
            hidden, weight, bias, index, targets, (ones, ones), every_term, transform, plan, needs
        )
        previous = _triton.set_gradient_filter("auto")
        loss_terms = _GradCoefficients(ones, None, ones, None)
        _triton.backward_blocks(
            hidden, weight, bias, None, targets, (ones, ones), loss_terms, transform, plan, needs
        )
        _triton.set_gradient_filter(previous)
    finally:
        for name, value in saved.items():
            setattr(_triton, name, value)
    return launches


def specialise(kernel, args, kwargs, capability: int) -> tuple[ASTSource, dict, GPUTarget]:
    """The compiler input of one launch, specialised as ``JITFunction.run`` would on that GPU."""
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(
        backend, kwargs, bound_args, specialization, options
    )
    return ASTSource(kernel, signature, constexprs, attrs), options.__dict__, target


def main(capabilities: list[int]) -> None:
    """Compile one launch per kernel and set of constexpr switches, per capability."""
    seen = set()
    for kernel, args, kwargs in record_launches():
        switches = sorted(k for k, v in kwargs.items() if v is True)
        for capability in capabilities:
            key = (kernel.__name__, capability, tuple(switches))
            if key in seen:
                continue
            seen.add(key)
            source, options, target = specialise(kernel, args, kwargs, capability)
            compiled = compile(source, target=target, options=options)
            ttgir = compiled.asm["ttgir"]
            report = {
                "kernel": kernel.__name__,
                "capability": capability,
                "shared_bytes": compiled.metadata.shared,
                "pipelined": "async_copy_global_to_local" in ttgir,
                "wgmma": "warp_group_dot" in ttgir,
                "switches": switches,
            }
            print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main([int(c) for c in sys.argv[1:]] or [90])
