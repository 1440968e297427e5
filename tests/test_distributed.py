"""Vocab-parallel ops (``process_group=``) against the single-process oracle, on CPU with gloo.

Each world size (2 and 3 ranks) is one group of spawned processes that runs every scenario in
turn, the bad-input ones first: a rank left behind in a collective by an error would hang or
desynchronise every later scenario. The processes return their outputs and gradients; the tests
below compare them with ``chunklogits.reference`` on the whole head (accuracy oracle: fp64 truth
vs the naive computation in the same dtype).
"""

from __future__ import annotations

import copy
import functools
import itertools
from dataclasses import dataclass, field

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from transformers import LlamaForCausalLM

import chunklogits
from chunklogits import assisted, reference, sampling
from chunklogits.distributed import local_head
from tests.helpers import (
    assert_accuracy_within_rounding,
    assert_as_accurate,
    assert_matches_kept_vocabulary,
    assert_top_k_within_rounding,
    infinite_bias_head,
    logprob_step,
    run_ranks,
    tiny_llama_config,
)
from tests.test_assisted import _Rounds

WORLDS = (2, 3)
_DIM = 24
_ROWS = (3, 7)


# --- numeric scenarios: outputs and every gradient vs the single-process oracle -----------------


@dataclass(frozen=True)
class Case:
    op: str  # "loss", "logprobs" or "logsumexp"
    dtype: torch.dtype
    vocab: int
    split: str  # "even" (torch.chunk's sizes, as DTensor shards) or "uneven"
    bias: bool = False
    ignored: float = 0.0  # fraction of labels set to ignore_index
    dtensor: bool = False  # the head is an nn.Linear parallelised with ColwiseParallel
    options: dict = field(default_factory=dict)


CASES = {
    "loss_mean_ignored": Case("loss", torch.float32, 1001, "even", ignored=0.3),
    "loss_none_all_options": Case(
        "loss",
        torch.float32,
        1001,
        "uneven",
        bias=True,
        ignored=0.2,
        options=dict(
            reduction="none",
            label_smoothing=0.1,
            z_loss=1e-3,
            softcap=5.0,
            logit_scale=0.7,
            shards=3,
            chunk_size=4,
        ),
    ),
    "loss_shift_bf16": Case(
        "loss",
        torch.bfloat16,
        517,
        "uneven",
        ignored=0.1,
        options=dict(shift=True, num_items_in_batch=9, label_smoothing=0.05),
    ),
    "logprobs_entropy": Case(
        "logprobs",
        torch.float32,
        1001,
        "uneven",
        bias=True,
        options=dict(return_entropy=True, temperature=0.7, softcap=3.0, chunk_size=5),
    ),
    "logprobs_entropy_bf16": Case(
        "logprobs", torch.bfloat16, 1001, "even", options=dict(return_entropy=True)
    ),
    "logsumexp": Case(
        "logsumexp", torch.float32, 1001, "uneven", options=dict(logit_scale=1.3, temperature=1.5)
    ),
    "loss_class_weight_z_loss_accuracy": Case(
        "loss",
        torch.float32,
        1001,
        "uneven",
        bias=True,
        ignored=0.3,
        options=dict(
            class_weight=torch.rand(1001, generator=torch.Generator().manual_seed(2)),
            z_loss=1e-3,
            return_z_loss=True,
            return_token_accuracy=True,
            softcap=5.0,
            shards=3,
        ),
    ),
    "dtensor_colwise_loss": Case(
        "loss",
        torch.float32,
        1001,
        "even",
        bias=True,
        ignored=0.2,
        dtensor=True,
        options=dict(label_smoothing=0.1),
    ),
}

# Relative slice sizes of the "uneven" split: one small slice among large ones.
_UNEVEN = {2: (1, 6), 3: (3, 1, 8)}


def _bounds(vocab: int, world: int, split: str) -> list[int]:
    """Where each rank's slice starts, then the vocabulary size."""
    if split == "even":
        sizes = [len(chunk) for chunk in torch.arange(vocab).chunk(world)]
    else:
        weights = _UNEVEN[world]
        cuts = [round(vocab * sum(weights[:i]) / sum(weights)) for i in range(world + 1)]
        sizes = [b - a for a, b in itertools.pairwise(cuts)]
    return [sum(sizes[:i]) for i in range(world + 1)]


def _inputs(case: Case, dtype: torch.dtype):
    """hidden, weight, bias (rounded to the case's dtype, held in ``dtype``) and labels; every
    process draws the same ones."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(*_ROWS, _DIM, generator=g, dtype=torch.float64)
    weight = torch.randn(case.vocab, _DIM, generator=g, dtype=torch.float64) * (3 / _DIM**0.5)
    bias = torch.randn(case.vocab, generator=g, dtype=torch.float64) * 0.5
    labels = torch.randint(0, case.vocab, _ROWS, generator=g)
    labels[torch.rand(_ROWS, generator=g) < case.ignored] = -100
    hidden, weight, bias = (t.to(case.dtype).to(dtype) for t in (hidden, weight, bias))
    return hidden, weight, bias if case.bias else None, labels


def _run(module, case: Case, hidden, weight, bias, labels, **extra) -> list[torch.Tensor]:
    """The case's op from ``module`` (chunklogits or reference) as a list of outputs, and the
    backward pass of a fixed random combination of them."""
    if case.op == "loss":
        outs = module.linear_cross_entropy(
            hidden, weight, labels, bias=bias, **case.options, **extra
        )
    elif case.op == "logprobs":
        outs = module.token_logprobs(hidden, weight, labels, bias=bias, **case.options, **extra)
    else:
        outs = module.logsumexp(hidden, weight, bias=bias, **case.options, **extra)
    outs = list(outs) if isinstance(outs, tuple) else [outs]
    g = torch.Generator().manual_seed(1)
    upstream = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in outs]
    sum((o * u).sum() for o, u in zip(outs, upstream, strict=True)).backward()
    return [o.detach() for o in outs]


def _numeric_case(rank: int, world: int, case: Case) -> dict:
    hidden, weight, bias, labels = _inputs(case, case.dtype)
    hidden.requires_grad_()
    if case.dtensor:
        head = nn.Linear(_DIM, case.vocab, bias=bias is not None, dtype=case.dtype)
        with torch.no_grad():
            head.weight.copy_(weight)
            if bias is not None:
                head.bias.copy_(bias)
        parallelize_module(head, init_device_mesh("cpu", (world,)), ColwiseParallel())
        weight, bias, group = local_head(head.weight, head.bias)
        outs = _run(chunklogits, case, hidden, weight, bias, labels, process_group=group)
        weight_grad = head.weight.grad.to_local()
        bias_grad = None if bias is None else head.bias.grad.to_local()
    else:
        start, end = _bounds(case.vocab, world, case.split)[rank : rank + 2]
        weight = weight[start:end].clone().requires_grad_()
        bias = None if bias is None else bias[start:end].clone().requires_grad_()
        outs = _run(chunklogits, case, hidden, weight, bias, labels, process_group=dist.group.WORLD)
        weight_grad, bias_grad = weight.grad, None if bias is None else bias.grad
    return {"outs": outs, "hidden": hidden.grad, "weight": weight_grad, "bias": bias_grad}


@functools.cache
def _single_process(name: str, dtype: torch.dtype) -> dict:
    case = CASES[name]
    hidden, weight, bias, labels = _inputs(case, dtype)
    leaves = [t.requires_grad_() for t in (hidden, weight, bias) if t is not None]
    outs = _run(reference, case, hidden, weight, bias, labels)
    grads = [leaf.grad for leaf in leaves] + [None]
    return {"outs": outs, "hidden": grads[0], "weight": grads[1], "bias": grads[2]}


# --- sampling: the same tokens as one process holding the whole head ----------------------------


@dataclass(frozen=True)
class SampleCase:
    head: str  # "peaked" (a few likely tokens), "flat" (thousands comparably likely) or "tied"
    options: dict
    calls: int = 1  # consecutive calls (a generator's key changes between them)


_SAMPLE_ROWS = 8
_SAMPLE_VOCAB = {"peaked": 1001, "flat": 2003, "tied": 1024}
# The "tied" head: exact logits (zero weight, the bias is the logit): 5 tokens in [3, 4), then
# _TIED tokens at exactly 2.5 spread over the vocabulary (so over every rank), the rest in [0, 2).
_TIED = 400

SAMPLE_CASES = {
    "greedy_penalty": SampleCase("peaked", dict(do_sample=False, repetition_penalty=1.4)),
    "plain": SampleCase("peaked", dict(top_k=0)),
    "temperature": SampleCase("peaked", dict(top_k=0, temperature=0.7, return_logprobs=True)),
    "top_k": SampleCase("peaked", dict(top_k=40, return_logprobs=True)),
    "top_p": SampleCase("peaked", dict(top_k=0, top_p=0.8)),
    "min_p": SampleCase("peaked", dict(top_k=0, min_p=0.05)),
    "all_options": SampleCase(
        "peaked",
        dict(
            top_k=30,
            top_p=0.9,
            min_p=0.02,
            temperature=0.8,
            repetition_penalty=1.3,
            return_logprobs=True,
        ),
    ),
    # Nucleus and min-p's set far beyond the 256 candidates: the bisection search and the masked
    # pass decide.
    "nucleus_search": SampleCase(
        "flat", dict(top_k=0, top_p=0.95, temperature=3.0, return_logprobs=True)
    ),
    "min_p_masked_pass": SampleCase("flat", dict(top_k=0, min_p=0.3, temperature=2.0)),
    # The cut-offs' mass and entropy summed over the ranks.
    "cutoffs_masked_pass": SampleCase(
        "flat",
        dict(top_k=0, epsilon_cutoff=4e-4, eta_cutoff=0.2, temperature=2.0, return_logprobs=True),
    ),
    # Ties at top-p's crossing value beyond the candidates: the tied tokens are counted per rank.
    "ties_at_the_crossing": SampleCase("tied", dict(top_k=0, top_p=0.5)),
    "generator": SampleCase("peaked", dict(top_k=50, temperature=1.2), calls=3),
}


def _sample_inputs(case: SampleCase):
    """hidden ``[B, D]``, weight, bias, prev_tokens (with padding -1 and tokens of every slice)."""
    vocab = _SAMPLE_VOCAB[case.head]
    g = torch.Generator().manual_seed(7)
    if case.head == "tied":
        bias = torch.rand(vocab, generator=g) * 2.0
        order = torch.randperm(vocab, generator=g)
        bias[order[:5]] = 3.0 + torch.rand(5, generator=g)
        bias[order[5 : 5 + _TIED]] = 2.5
        hidden, weight = torch.zeros(_SAMPLE_ROWS, _DIM), torch.zeros(vocab, _DIM)
    else:
        scale = 0.1 if case.head == "flat" else 1.0
        hidden = torch.randn(_SAMPLE_ROWS, _DIM, generator=g) * scale
        weight = torch.randn(vocab, _DIM, generator=g) * (3 / _DIM**0.5)
        bias = torch.randn(vocab, generator=g) * 0.5
    prev = torch.randint(-1, vocab, (_SAMPLE_ROWS, 12), generator=g)
    return hidden, weight, bias, prev


def _draws(case: SampleCase, hidden, weight, bias, prev, generator_seed: int, **extra) -> list:
    """The case's ``calls`` consecutive draws (tokens, or NextTokens with log-probs)."""
    options = {"prev_tokens": prev, **case.options}
    if case.calls > 1:
        options["generator"] = torch.Generator().manual_seed(generator_seed)
    else:
        options["seed"] = 11
    return [
        sampling.sample_next(hidden, weight, bias=bias, **options, **extra)
        for _ in range(case.calls)
    ]


def _sample_case(rank: int, world: int, case: SampleCase) -> list:
    hidden, weight, bias, prev = _sample_inputs(case)
    start, end = _bounds(weight.shape[0], world, "uneven")[rank : rank + 2]
    # Each rank's own generator seed: group rank 0's key is used on every rank.
    draws = _draws(
        case,
        hidden,
        weight[start:end],
        bias[start:end],
        prev,
        generator_seed=3 + rank,
        shards=2,
        process_group=dist.group.WORLD,
    )
    return [tuple(d) if isinstance(d, tuple) else d for d in draws]  # plain types travel back


# --- bad inputs: the same error on every rank, and no rank left waiting --------------------------

_SLICES = (20, 15, 25)  # rank r holds _SLICES[r] vocabulary rows


def _loss(hidden, weight, labels, **kwargs):
    return chunklogits.linear_cross_entropy(hidden, weight, labels, **kwargs)


def _logprobs(hidden, weight, labels, **kwargs):
    return chunklogits.token_logprobs(hidden, weight, labels, **kwargs)


def _logsumexp(hidden, weight, labels, **kwargs):
    return chunklogits.logsumexp(hidden, weight, **kwargs)


def _accuracy(hidden, weight, labels, **kwargs):
    return chunklogits.token_accuracy(hidden, weight, labels, **{"top_k": 2, **kwargs})


def _topk_logprobs(hidden, weight, labels, **kwargs):
    return chunklogits.topk_logprobs(hidden, weight, **{"k": 4, **kwargs})


def _sample(hidden, weight, labels, **kwargs):
    options = {"seed": 0, "repetition_penalty": 1.3, **kwargs}
    return sampling.sample_next(hidden, weight, prev_tokens=labels[:, None], **options)


# name: (op, ranks that get the change ("one": rank 1, "all"), change of the inputs and keyword
# arguments, expected error type, what its message starts with; {vocab}: the whole vocabulary)
BAD_INPUTS = {
    "hidden_size": (
        _loss,
        "one",
        lambda a, k: a.update(hidden=a["hidden"][:, :-1], weight=a["weight"][:, :-1]),
        ValueError,
        "weight: expected the same hidden size D on every rank",
    ),
    "dtype": (
        _loss,
        "one",
        lambda a, k: a.update(hidden=a["hidden"].bfloat16(), weight=a["weight"].bfloat16()),
        ValueError,
        "hidden: expected the same dtype",
    ),
    "rows": (
        _logprobs,
        "one",
        lambda a, k: a.update(hidden=a["hidden"][:-1], labels=a["labels"][:-1]),
        ValueError,
        "hidden: expected the same number of rows",
    ),
    "hidden_values": (
        _logsumexp,
        "one",
        lambda a, k: a.update(hidden=a["hidden"] + 1),
        ValueError,
        "hidden: expected the same hidden states on every rank",
    ),
    "label_values": (
        _loss,
        "one",
        lambda a, k: a.update(labels=a["labels"].roll(1)),
        ValueError,
        "labels: expected the same values",
    ),
    "ignored_on_one_rank": (
        _loss,
        "one",
        lambda a, k: a["labels"].__setitem__(0, -100),
        ValueError,
        "labels: expected the same number of positions that are not ignored",
    ),
    "bias_on_one_rank": (
        _loss,
        "one",
        lambda a, k: k.update(bias=torch.zeros(15)),
        ValueError,
        "bias: expected the same presence",
    ),
    "requires_grad": (
        _loss,
        "one",
        lambda a, k: a["hidden"].requires_grad_(),
        ValueError,
        "hidden: expected the same requires_grad",
    ),
    "softcap": (
        _logprobs,
        "one",
        lambda a, k: k.update(softcap=2.0),
        ValueError,
        "softcap: expected the same value",
    ),
    "labels_dtype_on_one_rank": (
        _loss,
        "one",
        lambda a, k: a.update(labels=a["labels"].float()),
        TypeError,
        "labels: expected an integer tensor",
    ),
    "shards_beyond_slice": (
        _loss,
        "one",
        lambda a, k: k.update(shards=16),
        ValueError,
        "shards: expected an int in [1, 15], got 16",
    ),
    "label_out_of_vocabulary": (
        _loss,
        "all",
        lambda a, k: a["labels"].__setitem__(0, 1000),
        ValueError,
        "labels: expected values in [0, {vocab})",
    ),
    "token_out_of_vocabulary": (
        _logprobs,
        "all",
        lambda a, k: a["labels"].__setitem__(2, -1),
        ValueError,
        "tokens: expected values in [0, {vocab})",
    ),
    "accuracy_top_k": (
        _accuracy,
        "one",
        lambda a, k: k.update(top_k=3),
        ValueError,
        "top_k: expected the same value on every rank",
    ),
    "topk_logprobs_k": (
        _topk_logprobs,
        "one",
        lambda a, k: k.update(k=2),
        ValueError,
        "k: expected the same value on every rank",
    ),
    "topk_logprobs_k_beyond_vocabulary": (
        _topk_logprobs,
        "all",
        lambda a, k: k.update(k=100),
        ValueError,
        "k: expected an int in [1, V = {vocab}], got 100",
    ),
    "process_group_type": (
        _loss,
        "all",
        lambda a, k: k.update(process_group="world"),
        TypeError,
        "process_group: expected a torch.distributed.ProcessGroup or None",
    ),
    **{
        f"sampling_{name}": (
            _sample,
            "one",
            lambda a, k, change=change: k.update(change),
            ValueError,
            f"{name}: expected the same value on every rank",
        )
        for name, change in {
            "top_k": dict(top_k=7),
            "top_p": dict(top_p=0.5),
            "min_p": dict(min_p=0.1),
            "epsilon_cutoff": dict(epsilon_cutoff=0.01),
            "eta_cutoff": dict(eta_cutoff=0.01),
            "temperature": dict(temperature=0.5),
            "repetition_penalty": dict(repetition_penalty=1.5),
            "do_sample": dict(do_sample=False),
            "return_logprobs": dict(return_logprobs=True),
            "seed": dict(seed=1),
        }.items()
    },
    "sampling_generator_and_seed": (
        _sample,
        "one",
        lambda a, k: k.update(seed=None, generator=torch.Generator()),
        ValueError,
        "seed, generator: expected the same kind of randomness (a seed, a generator or neither) on",
    ),
    "sampling_prev_tokens": (
        _sample,
        "one",
        lambda a, k: a.update(labels=a["labels"].roll(1)),
        ValueError,
        "prev_tokens: expected the same values",
    ),
    "sampling_hidden_values": (
        _sample,
        "one",
        lambda a, k: a.update(hidden=a["hidden"] * 1.01),
        ValueError,
        "hidden: expected the same hidden states on every rank",
    ),
    "sampling_top_p_out_of_range": (
        _sample,
        "one",
        lambda a, k: k.update(top_p=1.5),
        ValueError,
        "top_p: expected a float in (0.0, 1.0], got 1.5",
    ),
    "sampling_shards_beyond_slice": (
        _sample,
        "one",
        lambda a, k: k.update(shards=16),
        ValueError,
        "shards: expected an int in [1, 15], got 16",
    ),
}
# Errors raised by rank 1's own checks, which the other ranks raise too.
_RAISED_ON_RANK_1 = (
    "labels_dtype_on_one_rank",
    "shards_beyond_slice",
    "sampling_top_p_out_of_range",
    "sampling_shards_beyond_slice",
)


def _raised(call) -> tuple[str, str]:
    """(error type name, message) of what ``call()`` raised, or ("", "") if nothing."""
    try:
        call()
    except (ValueError, TypeError) as error:
        return type(error).__name__, str(error)
    return "", ""


def _bad_call(rank: int, world: int, name: str) -> tuple[str, str]:
    op, who, change, _, _ = BAD_INPUTS[name]
    g = torch.Generator().manual_seed(5)
    args = {
        "hidden": torch.randn(6, _DIM, generator=g),
        "labels": torch.randint(0, sum(_SLICES[:world]) - 1, (6,), generator=g),
        "weight": torch.randn(_SLICES[rank], _DIM, generator=g),  # last: its size varies
    }
    kwargs = {"process_group": dist.group.WORLD}
    if who == "all" or rank == 1:
        change(args, kwargs)
    return _raised(lambda: op(**args, **kwargs))


# name: (how nn.Linear(D, 40) is parallelised, which of its parameters is passed as a plain
# tensor, expected error type, what its message starts with)
BAD_DTENSOR_HEADS = {
    "rowwise_weight": (
        RowwiseParallel,
        None,
        ValueError,
        "weight: expected a DTensor sharded on the vocabulary dimension 0",
    ),
    "plain_bias": (
        ColwiseParallel,
        "bias",
        ValueError,
        "bias: expected a DTensor placed like the weight",
    ),
    "plain_weight": (
        ColwiseParallel,
        "weight",
        TypeError,
        "bias: expected a plain tensor like the weight, got a DTensor",
    ),
}


def _bad_dtensor_head(rank: int, world: int, name: str) -> tuple[str, str]:
    style, plain, _, _ = BAD_DTENSOR_HEADS[name]
    head = nn.Linear(_DIM, 40)
    parallelize_module(head, init_device_mesh("cpu", (world,)), style())
    params = {"weight": head.weight, "bias": head.bias}
    if plain is not None:
        params[plain] = params[plain].full_tensor().detach()
    return _raised(lambda: local_head(**params))


# --- FSDP2: a small LM whose loss is chunklogits on its lm_head trains as in one process ---------

_STEPS = 4


class _TinyLM(nn.Module):
    def __init__(self, loss, vocab: int = 301, dim: int = 16):
        super().__init__()
        self.loss = loss
        self.embed = nn.Embedding(vocab, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.Tanh())
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, input_ids, labels):
        hidden = self.mlp(self.embed(input_ids))
        return self.loss(hidden, self.lm_head.weight, labels, shift=True)


def _batch(step: int, rank: int):
    g = torch.Generator().manual_seed(100 * step + rank)
    ids = torch.randint(0, 301, (2, 9), generator=g)
    labels = ids.masked_fill(torch.rand(ids.shape, generator=g) < 0.2, -100)
    return ids, labels


def _new_model(loss, dtype: torch.dtype) -> _TinyLM:
    torch.manual_seed(0)
    return _TinyLM(loss).to(dtype)


def _train(model, batches, lr: float) -> torch.Tensor:
    """``_STEPS`` SGD steps; each step ``batches(step)`` (a list of ``(ids, labels)``) through the
    model, the mean of their losses backpropagated. Returns the losses ``[steps, batches]``."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for step in range(_STEPS):
        outputs = [model(input_ids=ids, labels=labels) for ids, labels in batches(step)]
        step_losses = torch.stack([getattr(out, "loss", out) for out in outputs])
        step_losses.mean().backward()  # under FSDP2 (a batch per rank), averaged over the ranks
        optimizer.step()
        optimizer.zero_grad()
        losses.append(step_losses.detach())
    return torch.stack(losses)


def _fsdp2_losses(rank: int, world: int) -> torch.Tensor:
    model = _new_model(chunklogits.linear_cross_entropy, torch.float32)
    mesh = init_device_mesh("cpu", (world,))
    fully_shard(model.mlp, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return _train(model, lambda step: [_batch(step, rank)], lr=2.0)


def _single_process_losses(dtype: torch.dtype, world: int) -> torch.Tensor:
    model = _new_model(reference.linear_cross_entropy, dtype)
    return _train(model, lambda step: [_batch(step, rank) for rank in range(world)], lr=2.0)


# A wrapped Llama learns one fixed batch per rank (random batches teach a random model nothing).
_LLAMA_LR = 0.5


def _fsdp2_wrapped_llama_losses(rank: int, world: int, tied: bool) -> torch.Tensor:
    model = chunklogits.ChunkedLMHead.wrap(_llama(tied=tied)).train()
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return _train(model, lambda step: [_batch(0, rank)], lr=_LLAMA_LR)


def _single_process_llama_losses(dtype: torch.dtype, world: int, tied: bool) -> torch.Tensor:
    """The unwrapped transformers model, every rank's batch in one process."""
    model = _llama(tied=tied).to(dtype).train()
    return _train(model, lambda step: [_batch(0, rank) for rank in range(world)], lr=_LLAMA_LR)


# --- the spawned ranks --------------------------------------------------------------------------


# Leading tokens masked by a -inf bias: all of rank 0's slice of the even split (and part of
# rank 1's with 3 ranks).
_MASKED = 450


def _masked_slice(rank: int, world: int) -> list[torch.Tensor]:
    head = infinite_bias_head(_MASKED)
    start, end = _bounds(len(head.bias), world, "even")[rank : rank + 2]
    return logprob_step(
        chunklogits.token_logprobs, head.hidden, head.weight[start:end], head.kept[head.position],
        head.advantages, torch.device("cpu"), bias=head.bias[start:end],
        process_group=dist.group.WORLD,
    )  # fmt: skip


# --- decisions: token accuracy and top-k log-probs, the same as one process ---------------------

# (dtype, options): the model's bf16 logits under a softcap have many ties.
_DECISION_CASES = {
    "fp32": (torch.float32, {"softcap": 4.0}),
    "bf16_softcap": (torch.bfloat16, {"softcap": 1.5, "logit_scale": 0.8}),
}


def _decision_inputs(dtype: torch.dtype, options: dict):
    """A head of 1001 tokens; the label of position i is the model's (i mod 4)-th largest logit
    (so that top-1 and top-3 accuracies are neither 0 nor 1), some labels ignored."""
    case = Case("accuracy", dtype, 1001, "uneven", bias=True, ignored=0.2)
    hidden, weight, bias, labels = _inputs(case, dtype)
    decision = reference.model_logits(hidden, weight, bias=bias, **options).float()
    rank = (torch.arange(labels.numel()) % 4).reshape(_ROWS)
    near = decision.topk(4, -1).indices.gather(-1, rank[..., None]).squeeze(-1)
    return hidden, weight, bias, torch.where(labels != -100, near, labels)


def _decisions(rank: int, world: int) -> dict:
    results = {}
    for name, (dtype, options) in _DECISION_CASES.items():
        hidden, weight, bias, labels = _decision_inputs(dtype, options)
        start, end = _bounds(1001, world, "uneven")[rank : rank + 2]
        head = dict(bias=bias[start:end], process_group=dist.group.WORLD, **options)
        for top_k in (1, 3):
            results[name, "accuracy", top_k] = chunklogits.token_accuracy(
                hidden, weight[start:end], labels, top_k=top_k, shards=2, **head
            )
        top = chunklogits.topk_logprobs(
            hidden, weight[start:end], 6, temperature=0.7, chunk_size=4, **head
        )
        results[name, "topk"] = tuple(top)  # a plain tuple travels through torch.load
    return results


def _worker(rank: int, world: int) -> dict:
    bad = {name: _bad_call(rank, world, name) for name in BAD_INPUTS}
    bad.update({name: _bad_dtensor_head(rank, world, name) for name in BAD_DTENSOR_HEADS})
    results = {"bad": bad}
    results.update({name: _numeric_case(rank, world, case) for name, case in CASES.items()})
    results.update({name: _sample_case(rank, world, case) for name, case in SAMPLE_CASES.items()})
    results["generate"] = _generated(_llama(world))
    results["wrapped_parallel_llama"] = _wrapped_parallel_llama(rank, world)
    results["head_draws"] = _head_draws(world)
    results["masked_slice"] = _masked_slice(rank, world)
    results["decisions"] = _decisions(rank, world)
    if world == 2:
        results["assisted"] = _assisted(rank, world)
        results["fsdp2"] = _fsdp2_losses(rank, world)
        for tied in (False, True):
            results[f"fsdp2_wrapped_llama_tied={tied}"] = _fsdp2_wrapped_llama_losses(
                rank, world, tied
            )
    return results


@functools.cache
def _ranks(world: int) -> list[dict]:
    return run_ranks(_worker, world)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", CASES)
def test_matches_single_process(name, world):
    case = CASES[name]
    ranks = [results[name] for results in _ranks(world)]
    naive, exact = _single_process(name, case.dtype), _single_process(name, torch.float64)
    for rank, got in enumerate(ranks):
        for i, out in enumerate(got["outs"]):
            where = f"{name}, output {i}, rank {rank} of {world}"
            assert out.shape == exact["outs"][i].shape, where
            assert_as_accurate(out, naive["outs"][i], exact["outs"][i], case.dtype, where)
        where = f"{name}, hidden gradient, rank {rank} of {world}"
        assert_as_accurate(got["hidden"], naive["hidden"], exact["hidden"], case.dtype, where)
    for key in ("weight", "bias") if case.bias else ("weight",):
        # Each rank holds the gradient of its own slice; together they are the whole gradient.
        whole = torch.cat([got[key] for got in ranks])
        assert_as_accurate(whole, naive[key], exact[key], case.dtype, f"{name}, {key} gradient")


def _llama(parallel_world: int | None = None, tied: bool = False):
    """A small random Llama (vocabulary 301); its lm_head parallelised with ColwiseParallel over
    ``parallel_world`` ranks when given (replicated logits out, as for inference)."""
    torch.manual_seed(0)
    config = tiny_llama_config(
        301, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=0
    )
    model = LlamaForCausalLM(config).eval()
    if parallel_world is not None:
        mesh = init_device_mesh("cpu", (parallel_world,))
        parallelize_module(model, mesh, {"lm_head": ColwiseParallel(output_layouts=Replicate())})
    return model


_GENERATE = dict(
    max_new_tokens=6, do_sample=True, top_k=20, top_p=0.9, repetition_penalty=1.2, seed=5
)


def _generated(model) -> torch.Tensor:
    prompts = torch.randint(3, 301, (3, 5), generator=torch.Generator().manual_seed(2))
    return chunklogits.sample(model, prompts, **_GENERATE)


def _llama_outputs(model, parallel: bool) -> dict:
    """A (wrapped) Llama's loss and gradients, logits, sequence log-probs and sampled tokens on
    one batch (the same on every rank)."""
    ids, labels = _batch(0, 0)
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    head_grad = model.lm_head.weight.grad
    sequence_logprobs = chunklogits.sequence_logprobs if parallel else reference.sequence_logprobs
    return {
        "loss": out.loss.detach(),
        "head": head_grad.to_local() if parallel else head_grad,
        "embed": model.model.embed_tokens.weight.grad,
        "logits": model(input_ids=ids).logits.detach(),
        "logprobs": sequence_logprobs(model, ids).detach(),
        "tokens": _generated(model),
    }


def _head_draws(world: int | None) -> dict:
    """``ChunkedLMHead(linear.weight, linear.bias).sample_next`` for an nn.Linear head,
    parallelised with ColwiseParallel over ``world`` ranks when given; and what calling such a
    head (not in place of the layer) raises."""
    torch.manual_seed(4)
    linear, hidden = nn.Linear(_DIM, 257), torch.randn(5, _DIM)
    if world is not None:
        parallelize_module(linear, init_device_mesh("cpu", (world,)), ColwiseParallel())
    head = chunklogits.ChunkedLMHead(linear.weight, linear.bias, shards=2)
    draws = [head.sample_next(hidden, seed=3, **options) for options in _HEAD_OPTIONS]
    return {"tokens": draws, "call": _raised(lambda: head(hidden))}


_HEAD_OPTIONS = (dict(top_k=20, temperature=0.8), dict(top_k=0, top_p=0.9), dict(do_sample=False))


def _assistant(parallel_world: int | None = None):
    """``_llama()`` with noise on every weight (it agrees with it on most tokens, not all), its
    lm_head parallelised like ``_llama``'s over ``parallel_world`` ranks when given."""
    draft = _llama()
    torch.manual_seed(3)
    with torch.no_grad():
        for parameter in draft.parameters():
            parameter.add_(torch.randn_like(parameter) * parameter.std() * 0.3)
    # Drafts of up to 4 tokens, not cut short after a token of low probability (all of this
    # random model's are).
    draft.generation_config.update(num_assistant_tokens=4, assistant_confidence_threshold=0.0)
    if parallel_world is not None:
        mesh = init_device_mesh("cpu", (parallel_world,))
        parallelize_module(draft, mesh, {"lm_head": ColwiseParallel(output_layouts=Replicate())})
    return draft


_ASSISTED = dict(max_new_tokens=16, pad_token_id=0)
_SPECULATIVE = (
    dict(seed=0, top_k=20, temperature=0.8),
    dict(seed=1, top_p=0.9),
    dict(seed=2, top_k=50, top_p=0.8, temperature=1.3),
)


def _assisted_prompt(repeats: int = 1) -> torch.Tensor:
    return torch.randint(3, 301, (1, 6), generator=torch.Generator().manual_seed(6)).repeat(
        1, repeats
    )


def _assisted_runs(target, draft) -> dict:
    """Greedy decoding with ``draft`` and with prompt lookup, and speculative sampling with
    ``draft`` for each of ``_SPECULATIVE``'s seeds and options (a fresh copy of the draft each
    time: its config keeps no state from one call to the next)."""

    def run(prompt, **options):
        return chunklogits.sample(target, prompt, **_ASSISTED, **options)

    return {
        "greedy": run(_assisted_prompt(), assistant_model=copy.deepcopy(draft), do_sample=False),
        "lookup": run(_assisted_prompt(3), prompt_lookup_num_tokens=3, do_sample=False),
        "speculative": [
            run(_assisted_prompt(), assistant_model=copy.deepcopy(draft), do_sample=True, **o)
            for o in _SPECULATIVE
        ],
    }


def _assisted(rank: int, world: int) -> dict:
    """Assisted decoding with a ColwiseParallel target head, the draft's head replicated or
    parallelised too; and speculative sampling without a seed, each rank's default generator
    seeded differently."""
    target = _llama(world)
    torch.manual_seed(rank)
    unseeded = chunklogits.sample(
        target, _assisted_prompt(), assistant_model=_assistant(), do_sample=True, **_ASSISTED
    )
    return {
        "replicated": _assisted_runs(target, _assistant()),
        "parallel": _assisted_runs(target, _assistant(world)),
        "unseeded": unseeded,
    }


def _wrapped_parallel_llama(rank: int, world: int) -> dict:
    return _llama_outputs(chunklogits.ChunkedLMHead.wrap(_llama(world)), parallel=True)


def _naive_logprobs(case: SampleCase, inputs, tokens, dtype: torch.dtype):
    """HF's processed and raw log-probs of ``tokens`` from the materialised logits in ``dtype``."""
    hidden, weight, bias, prev = (t.to(dtype) if t.is_floating_point() else t for t in inputs)
    options = {k: v for k, v in case.options.items() if k != "return_logprobs"}
    raw = reference.logits(hidden, weight, bias=bias)
    scores = reference.next_token_scores(raw, prev_tokens=prev, **options)
    picked = tokens[:, None]
    return [z.log_softmax(-1).gather(1, picked).squeeze(1) for z in (scores, raw)]


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", SAMPLE_CASES)
def test_sampling_matches_single_process(name, world):
    case = SAMPLE_CASES[name]
    inputs = _sample_inputs(case)
    expected = _draws(case, *inputs, generator_seed=3)
    for rank, results in enumerate(_ranks(world)):
        for call, (ours, single) in enumerate(zip(results[name], expected, strict=True)):
            where = f"{name}, call {call}, rank {rank} of {world}"
            if not case.options.get("return_logprobs"):
                assert torch.equal(ours, single), f"{where}: {ours} vs {single}"
                continue
            assert torch.equal(ours[0], single.tokens), f"{where}: {ours} vs {single}"
            naive = _naive_logprobs(case, inputs, single.tokens, torch.float32)
            exact = _naive_logprobs(case, inputs, single.tokens, torch.float64)
            assert torch.isfinite(naive[0]).all(), where  # HF's processors keep every token drawn
            for got, n, e, what in zip(ours[1:], naive, exact, ("logprobs", "raw"), strict=True):
                assert_as_accurate(got, n, e, torch.float32, f"{where}, {what}")


@pytest.mark.parametrize("world", WORLDS)
def test_sample_with_a_colwise_parallel_lm_head(world):
    expected = _generated(_llama())
    assert expected.shape == (3, 5 + _GENERATE["max_new_tokens"])
    for rank, results in enumerate(_ranks(world)):
        assert torch.equal(results["generate"], expected), f"rank {rank} of {world}"


@pytest.mark.parametrize("world", WORLDS)
def test_wrapped_llama_with_a_colwise_parallel_lm_head(world):
    """ChunkedLMHead.wrap on a model whose lm_head is ColwiseParallel: loss, every gradient,
    logits, sequence log-probs and sampled tokens as the unwrapped model's in one process."""
    naive = _llama_outputs(_llama(), parallel=False)
    exact = _llama_outputs(_llama().double(), parallel=False)
    ranks = [results["wrapped_parallel_llama"] for results in _ranks(world)]
    for rank, ours in enumerate(ranks):
        for key in ("loss", "embed", "logits", "logprobs"):
            where = f"{key}, rank {rank} of {world}"
            assert_as_accurate(ours[key], naive[key], exact[key], torch.float32, where)
        assert torch.equal(ours["tokens"], naive["tokens"]), f"rank {rank} of {world}"
    # Each rank holds the gradient of its own slice of the head.
    whole = torch.cat([ours["head"] for ours in ranks])
    assert_as_accurate(whole, naive["head"], exact["head"], torch.float32, "lm_head gradient")


@pytest.mark.parametrize("world", WORLDS)
def test_chunked_head_with_a_colwise_parallel_weight(world):
    expected = _head_draws(None)
    assert expected["call"] == ("", "")
    for rank, results in enumerate(_ranks(world)):
        ours = results["head_draws"]
        pairs = zip(_HEAD_OPTIONS, ours["tokens"], expected["tokens"], strict=True)
        for options, got, single in pairs:
            assert torch.equal(got, single), f"{options}, rank {rank} of {world}"
        assert ours["call"][0] == "TypeError", ours["call"]
        assert ours["call"][1].startswith("weight: a ChunkedLMHead computes plain logits from")


def test_sampling_cases_take_the_paths_they_name():
    """The flat and tied heads keep more tokens than the sampler's 256 candidates (so the
    bisection, the masked pass and the count of tied tokens across ranks run), and each sampling
    case draws different tokens in different rows."""
    for name, case in SAMPLE_CASES.items():
        hidden, weight, bias, prev = _sample_inputs(case)
        options = {k: v for k, v in case.options.items() if k != "return_logprobs"}
        scores = reference.next_token_scores(
            reference.logits(hidden, weight, bias=bias), prev_tokens=prev, **options
        )
        kept = (scores > -torch.inf).sum(1)
        if case.head != "peaked":
            assert (kept > sampling._CANDIDATES).all(), (name, kept)
        if case.head == "tied":
            tied = scores[0] == scores[0].sort(descending=True).values[5]
            assert tied.sum() < _TIED, "top-p should keep only some of the tied tokens"
        if case.options.get("do_sample", True):
            tokens = _draws(case, hidden, weight, bias, prev, generator_seed=3)[0]
            tokens = tokens.tokens if isinstance(tokens, tuple) else tokens
            assert tokens.unique().numel() > 1, name


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", [*BAD_INPUTS, *BAD_DTENSOR_HEADS])
def test_bad_input_raises_on_every_rank(name, world):
    kind, start = (BAD_INPUTS.get(name) or BAD_DTENSOR_HEADS[name])[-2:]
    start = start.format(vocab=sum(_SLICES[:world]))  # the whole vocabulary's size
    for rank, results in enumerate(_ranks(world)):
        raised, message = results["bad"][name]
        assert raised == kind.__name__, f"rank {rank} of {world} raised {raised!r}: {message}"
        assert message.startswith(start), f"rank {rank} of {world}: {message}"
        if name in _RAISED_ON_RANK_1 and rank != 1:
            assert message.endswith("(raised on group rank 1 of process_group)"), message


def test_fsdp2_training_matches_single_process():
    world = 2
    ours = torch.cat([results["fsdp2"] for results in _ranks(world)], dim=1)
    naive = _single_process_losses(torch.float32, world)
    exact = _single_process_losses(torch.float64, world)
    assert exact[-1].mean() < exact[0].mean() - 0.05, "the reference run should learn something"
    assert_as_accurate(ours, naive, exact, torch.float32, "FSDP2 losses per step and rank")


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_fsdp2_wrapped_llama_trains_as_the_unwrapped_model(tied):
    world = 2
    name = f"fsdp2_wrapped_llama_tied={tied}"
    ours = torch.cat([results[name] for results in _ranks(world)], dim=1)
    naive = _single_process_llama_losses(torch.float32, world, tied)
    exact = _single_process_llama_losses(torch.float64, world, tied)
    assert exact[-1].mean() < exact[0].mean() - 0.5, "the reference run should learn something"
    assert_as_accurate(ours, naive, exact, torch.float32, f"{name}: losses per step and rank")


def test_local_head_passes_plain_tensors_through():
    weight, bias = torch.randn(7, 3), torch.randn(7)
    local = local_head(weight, bias)
    assert local.weight is weight and local.bias is bias and local.process_group is None


def test_process_group_needs_initialised_distributed():
    assert not dist.is_initialized()
    group = dist.ProcessGroup(dist.HashStore(), 0, 1)
    hidden, weight, labels = torch.randn(2, 4), torch.randn(5, 4), torch.tensor([1, 3])
    with pytest.raises(ValueError, match=r"^process_group: expected an initialised torch\.distr"):
        chunklogits.linear_cross_entropy(hidden, weight, labels, process_group=group)


@pytest.mark.parametrize("world", WORLDS)
def test_a_slice_masked_by_an_infinite_bias(world):
    """Log-probs, entropy and gradients when a -inf bias masks one rank's whole slice: the ranks'
    statistics combine without NaN, as the reference over the unmasked tokens."""
    ranks = [results["masked_slice"] for results in _ranks(world)]
    for logp, entropy, hidden_grad, _ in ranks:
        ours = [logp, entropy, hidden_grad, torch.cat([r[3] for r in ranks])]
        assert_matches_kept_vocabulary(ours, infinite_bias_head(_MASKED))


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", _DECISION_CASES)
def test_accuracy_and_topk_logprobs_match_single_process(name, world):
    dtype, options = _DECISION_CASES[name]
    hidden, weight, bias, labels = _decision_inputs(dtype, options)
    decision = reference.model_logits(hidden, weight, bias=bias, **options).float()
    tempered = dict(bias=bias, temperature=0.7, **options)
    naive_logp = reference.logits(hidden, weight, **tempered).log_softmax(-1)
    f64 = {**tempered, "bias": bias.double()}
    exact_logp = reference.logits(hidden.double(), weight.double(), **f64).log_softmax(-1)
    for rank, results in enumerate(_ranks(world)):
        got = results["decisions"]
        where = f"{name}, rank {rank} of {world}"
        for top_k in (1, 3):
            expected = reference.token_accuracy(
                hidden, weight, labels, top_k=top_k, bias=bias, **options
            )
            # The case tells right from wrong (with many bf16 ties the top 3 may hold every label).
            assert 0 < expected < 1 or (top_k == 3 and expected == 1), where
            accuracy = got[name, "accuracy", top_k]
            assert_accuracy_within_rounding(accuracy, decision, labels, top_k, dtype)
        values, indices = got[name, "topk"]
        # The six largest model logits of the whole head, each once.
        assert_top_k_within_rounding(indices, decision, dtype, where)
        assert_as_accurate(
            values, naive_logp.gather(-1, indices), exact_logp.gather(-1, indices), dtype, where
        )


def test_assisted_decoding_with_a_colwise_parallel_lm_head(monkeypatch):
    """Greedy decoding with an assistant and with prompt lookup as generate()'s, speculative
    sampling as one process's for each seed, over a target head parallelised on 2 ranks with a
    replicated or a parallelised draft head; without a seed, every rank draws alike."""
    world = 2
    target, draft = _llama(), _assistant()
    with torch.no_grad():
        expected = {
            "greedy": target.generate(
                _assisted_prompt(),
                assistant_model=copy.deepcopy(draft),
                do_sample=False,
                **_ASSISTED,
            ),
            "lookup": target.generate(
                _assisted_prompt(3), prompt_lookup_num_tokens=3, do_sample=False, **_ASSISTED
            ),
        }
    rounds = _Rounds(monkeypatch, assisted._AssistantDrafts)
    single = _assisted_runs(target, draft)
    rounds.assert_drafts_were_kept_and_rejected()
    assert torch.equal(single["greedy"], expected["greedy"])
    assert torch.equal(single["lookup"], expected["lookup"])
    ranks = [results["assisted"] for results in _ranks(world)]
    for rank, results in enumerate(ranks):
        for head in ("replicated", "parallel"):
            ours, where = results[head], f"{head} draft head, rank {rank} of {world}"
            for name in ("greedy", "lookup"):
                assert torch.equal(ours[name], expected[name]), f"{name}, {where}"
            pairs = zip(_SPECULATIVE, ours["speculative"], single["speculative"], strict=True)
            for options, got, one in pairs:
                assert torch.equal(got, one), f"{options}, {where}: {got} vs {one}"
    assert torch.equal(ranks[0]["unseeded"], ranks[1]["unseeded"])
    assert ranks[0]["unseeded"].shape[1] > _assisted_prompt().shape[1]
