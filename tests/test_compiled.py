"""The compiled per-block passes (``set_block_compile``) against the eager ones and fp64 truth.

Every compile costs seconds to tens of seconds, so the cases share one transform structure (a
softcap and a logit scale; the temperature's value is not part of a graph) and a bias: one
graph per direction (fold, gradient) and GEMM dtype (fp32, bf16) serves every op, shape and
case, four in all, and the infinite-bias test, which needs no softcap, adds two (fp32)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import chunklogits as cl
from chunklogits import reference
from tests.helpers import assert_as_accurate, check_infinite_bias_mask, seeded

TRANSFORM = {"softcap": 6.0, "logit_scale": 1.5}
TEMPERATURE = 0.7
# Shards [0, 96), [96, 208), [208, 301); row chunks of 16, 16 and 10 rows.
BLOCKS = {"shards": 3, "chunk_size": 16}
VOCAB, FIRST_SHARD = 301, 96


@pytest.fixture
def compiled():
    previous = cl.set_block_compile(True)
    yield
    cl.set_block_compile(previous)


def head(dtype: torch.dtype):
    """hidden ``[2, 21, 40]``, weight ``[301, 40]`` with some rows equal to hidden rows (peaked
    softmaxes), a bias of -inf on the whole first shard and on 10% of the others (the softcap
    takes it to -softcap), labels with 20% ignored."""
    g = seeded(11)
    hidden = torch.randn(2, 21, 40, generator=g) / 40**0.5
    weight = torch.randn(VOCAB, 40, generator=g)
    weight[FIRST_SHARD : FIRST_SHARD + 10] = hidden[0, :10] * 4
    bias = torch.randn(VOCAB, generator=g) * 0.1
    masked = torch.rand(VOCAB, generator=g) < 0.1
    masked[:FIRST_SHARD] = True
    bias[masked] = -torch.inf
    labels = torch.randint(0, VOCAB, (2, 21), generator=g)
    labels.masked_fill_(torch.rand(2, 21, generator=g) < 0.2, -100)
    return hidden.to(dtype), weight.to(dtype), bias.to(dtype), labels


def run_ops(lib, hidden, weight, bias, labels, options=(), loss_options=()) -> dict:
    """Each op's results and the gradients of ``(hidden, weight, bias)`` of a weighted sum of
    them, by ``lib`` (chunklogits or its reference), ``options`` passed to every op and
    ``loss_options`` to the loss."""
    options, loss_options = dict(options), dict(loss_options)
    advantages = torch.randn(labels.shape, generator=torch.Generator().manual_seed(5))
    tokens = labels.clamp(min=0)
    ops = {
        "loss": lambda h, w, b: [
            lib.linear_cross_entropy(h, w, labels, bias=b, **TRANSFORM, **options, **loss_options)
        ],
        "logprobs": lambda h, w, b: lib.token_logprobs(
            h,
            w,
            tokens,
            bias=b,
            temperature=TEMPERATURE,
            return_entropy=True,
            **TRANSFORM,
            **options,
        ),
        "lse": lambda h, w, b: [
            lib.logsumexp(h, w, bias=b, temperature=TEMPERATURE, **TRANSFORM, **options)
        ],
    }
    results = {}
    for op, fn in ops.items():
        leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
        values = fn(*leaves)
        total = sum((v * advantages.to(v.dtype)).sum() if v.ndim else v for v in values)
        total.backward()
        for i, value in enumerate(values):
            results[f"{op} {i}"] = value.detach()
        for name, leaf in zip(("hidden", "weight", "bias"), leaves, strict=True):
            results[f"{op} grad {name}"] = leaf.grad
    return results


def chunklogits_ops(
    hidden, weight, bias, labels, compile_blocks: bool, grad_in_forward: bool, blocks=BLOCKS
):
    previous = cl.set_block_compile(compile_blocks)
    try:
        loss_options = {"grad_in_forward": grad_in_forward}
        return run_ops(cl, hidden, weight, bias, labels, blocks, loss_options)
    finally:
        cl.set_block_compile(previous)


@pytest.mark.parametrize("grad_in_forward", [False, True], ids=["recomputed", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_as_accurate_as_eager(cpu_gemm, dtype, grad_in_forward):
    # The loss by the recomputing backward or by the fused pass (grad_in_forward), the log-probs
    # and entropy, the log-sum-exp, and their gradients: compiled, as accurate as the eager path
    # and the naive computation, against fp64.
    check_compiled_ops(dtype, grad_in_forward, BLOCKS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_with_a_block_of_one_row(cpu_gemm, dtype):
    # Row chunks of 41 and 1 rows: the one-row blocks take the eager passes (a graph of their
    # own otherwise), in fp32, on the compiled pass's statistics and workspace.
    check_compiled_ops(dtype, True, {"shards": 3, "chunk_size": 41})


def check_compiled_ops(dtype, grad_in_forward, blocks):
    hidden, weight, bias, labels = head(dtype)
    ours = chunklogits_ops(hidden, weight, bias, labels, True, grad_in_forward, blocks)
    eager = chunklogits_ops(hidden, weight, bias, labels, False, grad_in_forward, blocks)
    naive = run_ops(reference, hidden, weight, bias, labels)
    exact = run_ops(reference, hidden.double(), weight.double(), bias.double(), labels)
    assert ours.keys() == exact.keys()
    for name, e in exact.items():
        assert ours[name].dtype == eager[name].dtype and ours[name].shape == e.shape, name
        assert_as_accurate(ours[name], eager[name], e, dtype, f"{name} vs eager")
        assert_as_accurate(ours[name], naive[name], e, dtype, f"{name} vs naive")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_nan_row_stays_in_its_row(cpu_gemm, compiled, dtype):
    # A NaN hidden row gives NaN log-prob, entropy and log-sum-exp in that row only.
    hidden, weight, bias, labels = head(dtype)
    hidden[1, 4, 7] = torch.nan
    tokens = labels.clamp(min=0)
    options = {"bias": bias, "temperature": TEMPERATURE, **TRANSFORM}

    def values(lib, hidden, weight, **blocks):
        logprobs = lib.token_logprobs(
            hidden, weight, tokens, return_entropy=True, **options, **blocks
        )
        return [*logprobs, lib.logsumexp(hidden, weight, **options, **blocks)]

    with torch.no_grad():
        ours = values(cl, hidden, weight, **BLOCKS)
    naive = values(reference, hidden, weight)
    options["bias"] = bias.double()
    exact = values(reference, hidden.double(), weight.double())
    for name, o, n, e in zip(["logprobs", "entropy", "lse"], ours, naive, exact, strict=True):
        nan_rows = torch.zeros_like(e, dtype=torch.bool)
        nan_rows[1, 4] = True
        assert torch.equal(o.isnan(), nan_rows), name
        assert_as_accurate(o, n, e, dtype, name)


@pytest.mark.parametrize("masked", ["scattered", 300], ids=["scattered", "leading"])
def test_compiled_masked_by_an_infinite_bias(compiled, masked):
    # Without a softcap a -inf bias masks tokens: rows whose running maximum is -inf (the first
    # two of 7 shards masked), logits far below the maximum at temperature 0.1 (the floor).
    check_infinite_bias_mask(masked, torch.device("cpu"))


def test_compile_setting_is_validated():
    with pytest.raises(TypeError, match="flag: expected a bool, got str"):
        cl.set_block_compile("yes")
    env = {**os.environ, "CHUNKLOGITS_COMPILE": "yes"}
    run = subprocess.run(
        [sys.executable, "-c", "import chunklogits"], env=env, capture_output=True, text=True
    )
    assert run.returncode != 0
    assert "CHUNKLOGITS_COMPILE: expected '0' or '1', got 'yes'" in run.stderr
    env["CHUNKLOGITS_COMPILE"] = "1"
    code = "import chunklogits as cl; print(cl.set_block_compile(False))"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.stdout.strip() == "True", run.stderr
