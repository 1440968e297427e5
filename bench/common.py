"""Shared benchmark plumbing: every implementation is timed by pytest-benchmark and measured by
``chunklogits.memory.peak()`` the same way, in the same run."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
import torch.nn.functional as F

from chunklogits import memory
from chunklogits._blocks import block_compute_dtype

MiB = 2**20
LLAMA3_VOCAB = 128_256

HEAD_SHAPES = {
    # (tokens N, hidden D, vocab V): the first CPU measurements' shape, and the shape of the
    # working-memory target (working memory <= 10% of hidden + weight + grads).
    "llama3-head-1k-x-256": (1024, 256, 128256),
    "llama3-head-2k-x-1024": (2048, 1024, 128256),
    # A shape whose three GEMMs (the floor) take about as long as the 1k x 256 x 128k one's with
    # 4x the hidden size and a quarter of the vocabulary: chunks hold ~4x the rows there.
    "head-1k-x-1024-x-32k": (1024, 1024, 32768),
}


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def instruction_set() -> dict:
    """What decides the speed of the block passes on this CPU: its vector extensions that
    multiply half precision natively, and the dtype the blocks' GEMMs run in for bf16 inputs."""
    cpu = torch.cpu
    flags = {
        name: bool(getattr(cpu, f"_is_{name}_supported", lambda: False)())
        for name in ("avx2", "avx512", "avx512_bf16", "amx_tile", "amx_fp16")
    }
    flags["bf16_gemm_dtype"] = str(block_compute_dtype(torch.bfloat16, torch.device("cpu")))
    flags["threads"] = torch.get_num_threads()
    return flags


def measure(
    benchmark,
    run: Callable[[], object],
    *,
    reset: Callable[[], object] = lambda: None,
    returned_bytes: int = 0,
    rounds: int = 3,
) -> None:
    """Time ``run`` (``rounds`` after one warm-up, ``reset`` before each) and record its peak
    memory above the entry level (``peak_mib``), and that peak minus the bytes of what it returns,
    e.g. gradients (``working_mib``), in ``benchmark.extra_info``."""
    benchmark.pedantic(run, setup=reset, rounds=rounds, iterations=1, warmup_rounds=1)
    reset()
    with memory.peak(device()) as used:
        run()
    reset()
    benchmark.extra_info["peak_mib"] = round(used.bytes / MiB, 1)
    benchmark.extra_info["working_mib"] = round((used.bytes - returned_bytes) / MiB, 1)


def measure_once(
    benchmark,
    run: Callable[[], object],
    *,
    reset: Callable[[], object] = lambda: None,
    returned_bytes: int = 0,
    warmup: bool = False,
) -> None:
    """``measure`` for a case whose one run takes minutes (a baseline's half-precision GEMMs on
    a CPU that does not multiply them natively): one timed run that also records the peak
    (the page faults this adds are negligible beside it), after a warm-up only with ``warmup``
    (a compiling implementation). ``extra_info["rounds"]`` says so."""
    if warmup:
        reset()
        run()
    used = []

    def timed():
        with memory.peak(device()) as peak:
            run()
        used.append(peak.bytes)

    benchmark.pedantic(timed, setup=reset, rounds=1, iterations=1, warmup_rounds=0)
    reset()
    benchmark.extra_info["rounds"] = 1
    benchmark.extra_info["peak_mib"] = round(used[0] / MiB, 1)
    benchmark.extra_info["working_mib"] = round((used[0] - returned_bytes) / MiB, 1)


def llama3_one_layer(max_positions: int, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A randomly initialised Llama with Llama-3's untied head (V = 128,256) on a one-layer
    D = 1024 decoder, seeded, on ``device()``: the model of the wrapped-model suites."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=LLAMA3_VOCAB,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=1,
        num_attention_heads=16,
        num_key_value_heads=8,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device(), dtype)


_heads: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def head_inputs(shape: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bf16 ``hidden [N, D]`` and ``weight [V, D]`` (both requiring grad) and tokens ``[N]`` of
    ``HEAD_SHAPES[shape]`` on ``device()``, built once per session."""
    if shape not in _heads:
        n, d, v = HEAD_SHAPES[shape]
        g = torch.Generator().manual_seed(0)
        hidden = torch.randn(n, d, generator=g) / d**0.5
        weight = torch.randn(v, d, generator=g) / d**0.25
        tokens = torch.randint(0, v, (n,), generator=g)
        tensors = [t.bfloat16().to(device()).requires_grad_() for t in (hidden, weight)]
        _heads[shape] = (*tensors, tokens.to(device()))
    return _heads[shape]


def unavailable(name: str) -> str | None:
    """Why an optional peer cannot run here, or None."""
    if (
        name.startswith("cut-cross-entropy")
        and importlib.util.find_spec("cut_cross_entropy") is None
    ):
        return "cut-cross-entropy is not installed (pip install cut-cross-entropy)"
    if name.startswith("liger"):
        if importlib.util.find_spec("liger_kernel") is None:
            return "liger-kernel is not installed"
        if not torch.cuda.is_available():
            return "Liger's kernels are Triton GPU kernels; no GPU here"
    if name == "torch-linear_cross_entropy" and not hasattr(F, "linear_cross_entropy"):
        return f"torch {torch.__version__} has no F.linear_cross_entropy"
    return None
