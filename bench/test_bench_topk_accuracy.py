"""Top-k log-probs, token accuracy and the loss's extra outputs (class weights, z-loss, token
accuracy): chunklogits against the materialising twins of ``chunklogits.reference``, in one run.

    pytest bench/test_bench_topk_accuracy.py --benchmark-only --benchmark-json=out/topk.json

Each case records ``peak_mib`` and ``working_mib`` (peak minus the returned gradients) in
``extra_info``, and what shows it computed the same thing: the largest log-prob error against
fp64 at the chosen tokens (``topk_max_error``), the accuracy (``accuracy``) or the loss and
accuracy (``loss``, ``accuracy``). The baselines are the naive computations of
``chunklogits.reference`` written with one GEMM, as a user would.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import chunklogits as cl
from bench.common import head_inputs, measure
from chunklogits.loss import LossOutput

SHAPE = "llama3-head-1k-x-256"
K = 20  # OpenAI's and vLLM's largest logprobs=k


def _labels(hidden, weight, tokens):
    """Half the labels the model's argmax (so that the accuracy is about 0.5), half random."""
    with torch.no_grad():
        argmax = torch.cat([(h @ weight.T).argmax(-1) for h in hidden.split(256)])
    half = torch.arange(tokens.numel(), device=tokens.device) % 2 == 0
    return torch.where(half, argmax, tokens)


def _naive_topk(hidden, weight):
    # One GEMM: the indices on the model's bf16 logits, the log-probs on their fp32 copy.
    logits = hidden @ weight.T
    indices = logits.topk(K, dim=-1).indices
    return logits.float().log_softmax(-1).gather(-1, indices), indices


TOPK = {
    "naive-upcast": _naive_topk,
    "chunklogits": lambda h, w: cl.topk_logprobs(h, w, K),
}


@pytest.mark.parametrize("impl", list(TOPK))
def test_topk_logprobs(benchmark, impl):
    hidden, weight, _ = head_inputs(SHAPE)
    outputs = []

    def step():
        with torch.no_grad():
            outputs.append(TOPK[impl](hidden, weight))

    benchmark.group = f"top-{K} log-probs, fwd (no grad) {SHAPE}"
    measure(benchmark, step, rounds=1)
    values, indices = outputs[-1]
    with torch.no_grad():
        rows = slice(0, 256)
        exact = (hidden[rows].double() @ weight.double().T).log_softmax(-1)
        error = (values[rows].double() - exact.gather(-1, indices[rows])).abs().max().item()
    benchmark.extra_info["topk_max_error"] = error


def _naive_accuracy(hidden, weight, labels, top_k=1):
    logits = (hidden @ weight.T).float()
    above = (logits > logits.gather(-1, labels[:, None])).sum(-1)
    return (above < top_k).float().mean()


ACCURACY = {
    "naive-upcast": _naive_accuracy,
    "chunklogits": cl.token_accuracy,
}


@pytest.mark.parametrize("impl", list(ACCURACY))
def test_token_accuracy(benchmark, impl):
    hidden, weight, tokens = head_inputs(SHAPE)
    labels = _labels(hidden, weight, tokens)
    outputs = []

    def step():
        with torch.no_grad():
            outputs.append(ACCURACY[impl](hidden, weight, labels))

    benchmark.group = f"token accuracy, fwd (no grad) {SHAPE}"
    measure(benchmark, step, rounds=1)
    benchmark.extra_info["accuracy"] = outputs[-1].item()


def _naive_loss(hidden, weight, labels, *, class_weight, z_loss, return_z_loss, **_):
    # What reference.linear_cross_entropy computes, with one GEMM (the model's bf16 logits serve
    # the accuracy, their fp32 copy the loss).
    logits = hidden @ weight.T
    z = logits.float()
    per_label = F.cross_entropy(z, labels, weight=class_weight, reduction="none")
    label_weight = class_weight[labels]
    z_term = z_loss * z.logsumexp(-1).square() * label_weight
    total = label_weight.sum()
    accuracy = (logits.float() > logits.float().gather(-1, labels[:, None])).sum(-1) == 0
    return LossOutput(
        (per_label + z_term).sum() / total, z_term.sum() / total, accuracy.float().mean()
    )


LOSS = {
    "naive-upcast": _naive_loss,
    "chunklogits": cl.linear_cross_entropy,
}


@pytest.mark.parametrize("impl", list(LOSS))
def test_loss_with_class_weight_z_loss_and_accuracy(benchmark, impl):
    hidden, weight, tokens = head_inputs(SHAPE)
    labels = _labels(hidden, weight, tokens)
    g = torch.Generator().manual_seed(2)
    class_weight = torch.rand(weight.shape[0], generator=g).to(weight.device)
    options = dict(class_weight=class_weight, z_loss=1e-4, return_z_loss=True)
    outputs = []

    def reset():
        hidden.grad = weight.grad = None

    def step():
        out = LOSS[impl](hidden, weight, labels, return_token_accuracy=True, **options)
        out.loss.backward()
        outputs.append(out)

    benchmark.group = f"loss + z-loss + accuracy, class weights, fwd+bwd {SHAPE}"
    measure(benchmark, step, reset=reset, returned_bytes=hidden.nbytes + weight.nbytes, rounds=1)
    benchmark.extra_info["loss"] = outputs[-1].loss.item()
    benchmark.extra_info["accuracy"] = outputs[-1].token_accuracy.item()
