"""Shared test helpers: seeding, per-dtype tolerances and the relative accuracy oracle."""

from __future__ import annotations

import math
from typing import NamedTuple

import pytest
import torch
from torch import Tensor

DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Absolute slack on top of the naive same-dtype error, relative to the largest magnitude of the
# fp64 result. fp32: 1e-5 (~80 eps): both computations are then within ~1e-6 of the truth and
# differ only in the order of summation and in the algebraic form of the softmax gradient; a
# formula error shows up at 1e-3 or more. Half precision: 1 eps, the extra rounding of each
# vocabulary shard's partial GEMM result (the naive computation does one GEMM over the whole
# vocabulary and rounds once).
_SLACK = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def seeded(seed: int = 0) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def confident_head(case: str, dtype: torch.dtype):
    """``(hidden, weight, bias, tokens)`` whose most probable token's log-probability lies
    below ``eps * |lse|``, asked in every row. ``"gap-15"``: one row, V = 2, D = 1, logits 5.9
    and -9.1 (lse ~ 5.9, log p ~ -3.1e-7 ~ 0.6 ulp of 5.9). ``"gap-20"``: 6 rows, V = 50,
    D = 8, token 7's logit ~ 20 above the others' (lse ~ 20, log p ~ -1e-7)."""
    if case == "gap-15":
        hidden, weight = torch.tensor([[1.0]]), torch.tensor([[5.9], [-9.1]])
        return hidden.to(dtype), weight.to(dtype), None, torch.tensor([0])
    g = seeded(11)
    hidden, weight = torch.randn(6, 8, generator=g), 0.05 * torch.randn(50, 8, generator=g)
    bias = torch.zeros(50)
    bias[7] = 20.0  # |hidden @ weight.T| < 0.5
    return hidden.to(dtype), weight.to(dtype), bias.to(dtype), torch.full((6,), 7)


def per_position_temperature(shape, seed: int = 9) -> Tensor:
    """fp32 temperatures ``shape``, one per position, spread over ``[0.3, 2.3)`` (sharper and
    flatter softmaxes than a temperature of 1), as RL trainers pass them per token."""
    return 0.3 + 2.0 * torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def assert_as_accurate(
    ours: Tensor,
    naive: Tensor,
    exact: Tensor,
    dtype: torch.dtype,
    what: str = "",
    scale: float | None = None,
) -> None:
    """The accuracy oracle of design.md: ``|exact - ours| <= |exact - naive| + slack`` elementwise,
    where ``exact`` is the fp64 ground truth and ``naive`` the materialising computation in
    ``dtype``; ``slack = _SLACK[dtype] * scale``, ``scale`` by default the largest finite
    ``|exact|`` (a NaN or inf entry would make the slack NaN or inf, and so excuse every other
    entry). A result that cancels terms far larger than itself (a divergence near 0) passes the
    terms' magnitude as ``scale``: in fp64 the naive computation is the exact one, and only the
    slack separates two roundings of those terms."""
    exact = exact.double()
    ours_error = _error(ours, exact)
    naive_error = _error(naive, exact)
    finite = exact[exact.isfinite()]
    if scale is None:
        scale = finite.abs().max().item() if finite.numel() else 0.0
    slack = _SLACK[dtype] * max(scale, 1e-30) if exact.numel() else 0.0
    # Both infinitely wrong (inf - inf) counts as equally accurate.
    excess = (ours_error - naive_error - slack).nan_to_num(nan=0.0)
    if exact.numel() and excess.max().item() > 0:
        worst = int(excess.argmax())
        raise AssertionError(
            f"{what}: ours is less accurate than the naive {dtype} computation at flat index "
            f"{worst}: |exact - ours| = {ours_error.flatten()[worst].item():.3g}, "
            f"|exact - naive| = {naive_error.flatten()[worst].item():.3g}, slack = {slack:.3g} "
            f"(exact {exact.flatten()[worst].item():.6g}, ours {ours.flatten()[worst].item():.6g})"
        )


def assert_as_accurate_in_norm(
    ours: Tensor, naive: Tensor, exact: Tensor, dtype: torch.dtype, what: str = ""
) -> None:
    """The accuracy rule per tensor instead of per element: ``||exact - ours|| <= ||exact -
    naive|| + slack * ||exact||`` (Frobenius norms, ``slack = _SLACK[dtype]``). For results that
    go on through half-precision computations both runs perform alike, such as a model's
    backward pass upstream of its output layer: inputs that differ by one rounding are rounded
    differently there, element by element, so the elementwise rule would compare two equally
    accurate samples of the same rounding noise."""
    exact = exact.double()
    ours_error = _error(ours, exact).norm().item()
    naive_error = _error(naive, exact).norm().item()
    slack = _SLACK[dtype] * exact.norm().item()
    if ours_error > naive_error + slack:
        raise AssertionError(
            f"{what}: ours is less accurate than the naive {dtype} computation: "
            f"||exact - ours|| = {ours_error:.3g}, ||exact - naive|| = {naive_error:.3g}, "
            f"slack = {slack:.3g}"
        )


# How far apart two computations of the same logits may lie from the GEMM's rounding alone,
# relative to the row's largest magnitude: a BLAS picks its kernel by the matrix shapes, so a GEMM
# of one vocabulary block and one of the whole matrix differ in the last bits (a few ulps; 1e-5
# is ~80 fp32 ulps). A half-precision product is rounded from such an fp32 sum, to either
# neighbour: one unit in that dtype's last place.
_GEMM_ROUNDING = {torch.float64: 1e-12, torch.float32: 1e-5}


def gemm_rounding(decision: Tensor, dtype: torch.dtype) -> Tensor:
    """``[..., 1]``: per row of the logits ``decision [..., V]`` (fp32 values of logits computed
    in ``dtype``), the distance below which two logits may be ordered differently by two
    computations that differ only in the GEMM's rounding."""
    relative = _GEMM_ROUNDING.get(dtype, torch.finfo(dtype).eps)
    magnitude = decision.nan_to_num(0.0, 0.0, 0.0).abs().amax(-1, keepdim=True)
    return relative * magnitude


def assert_top_k_within_rounding(
    indices: Tensor, decision: Tensor, dtype: torch.dtype, what: str = ""
) -> None:
    """``indices [..., k]`` are the ``k`` largest of the naive logits ``decision [..., V]`` in
    descending order, each token once, up to the GEMM's rounding: the naive logit at the j-th
    index is within ``gemm_rounding`` of the j-th largest naive logit. Where neighbouring naive
    logits lie further apart the tokens and their order are exactly the naive ones; among
    nearer ones (a near-tie) any order passes. Exact ties are tested on exact data."""
    assert (indices.sort(-1).values.diff(dim=-1) > 0).all(), f"{what}: a token chosen twice"
    largest = decision.sort(-1, descending=True).values[..., : indices.shape[-1]]
    chosen = decision.gather(-1, indices)
    off = (chosen - largest).abs().masked_fill(chosen == largest, 0.0)
    wrong = ~(off <= gemm_rounding(decision, dtype))
    if wrong.any():
        where = tuple(wrong.nonzero()[0].tolist())
        raise AssertionError(
            f"{what}: at {where} the chosen token's logit {chosen[where].item():.9g} is not the "
            f"one of rank {where[-1]} (0: the largest), {largest[where].item():.9g}, within the "
            "GEMM's rounding"
        )


def accuracy_bounds(
    decision: Tensor, labels: Tensor, top_k: int, dtype: torch.dtype, ignore_index: int = -100
) -> tuple[Tensor, Tensor]:
    """Whether each label of ``labels [...]`` is accurate under the naive logits ``decision
    [..., V]`` (fewer than ``top_k`` logits strictly greater than its own; NaN is never greater)
    if every near-tie (``gemm_rounding``) went against it, and if every one went for it: bool
    tensors of ``labels``' shape, False at ignored positions. Logits that differ from the naive
    ones by the GEMM's rounding alone give an accuracy between the two."""
    kept = labels != ignore_index
    labels = labels.clamp(min=0)[..., None]
    own = decision.gather(-1, labels)
    tol = gemm_rounding(decision, dtype)
    other = torch.ones_like(decision, dtype=torch.bool).scatter_(-1, labels, False)
    at_worst = ((decision > own - tol) & other).sum(-1) < top_k
    at_best = (decision > own + tol).sum(-1) < top_k
    return at_worst & kept, at_best & kept


def assert_accuracy_within_rounding(
    ours: Tensor, decision: Tensor, labels: Tensor, top_k: int, dtype: torch.dtype, **reduce
) -> None:
    """``ours`` (``token_accuracy``'s, or ``linear_cross_entropy``'s with ``reduce``'s
    ``reduction``: "mean", "sum" or "none") between the naive accuracies of ``accuracy_bounds``
    (equal to the naive accuracy when no label is near a tie)."""
    low, high = (b.float() for b in accuracy_bounds(decision, labels, top_k, dtype))
    reduction = reduce.get("reduction", "mean")
    if reduction != "none":
        kept = (labels != -100).sum()
        low, high = low.sum(), high.sum()
        if reduction == "mean":
            low, high = low / kept, high / kept
    assert ours.dtype == torch.float32
    assert ((low <= ours) & (ours <= high)).all(), f"accuracy {ours} outside [{low}, {high}]"


def _error(result: Tensor, exact: Tensor) -> Tensor:
    """``|result - exact|`` elementwise, infinite where ``result`` is NaN but ``exact`` is not (a
    NaN would otherwise pass every comparison), 0 where both are NaN or the same infinity."""
    error = (result.double() - exact).abs()
    same = (result.double() == exact) | (result.isnan() & exact.isnan())
    return error.masked_fill(same, 0.0).nan_to_num(nan=math.inf)


def run_ranks(worker, world: int, *args, timeout: float = 180.0) -> list:
    """Run ``worker(rank, world, *args)`` in ``world`` fresh processes that have joined one gloo
    process group (CPU), and return each rank's return value, by rank. ``worker`` must be a
    module-level function (it is pickled by name). A rank that raises fails the call with its
    traceback; ranks still running after ``timeout`` seconds are killed and reported as hung."""
    import tempfile
    import time

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out_dir:
        context = mp.start_processes(
            _rank_main,
            args=(world, _free_port(), out_dir, worker, args),
            nprocs=world,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        while not context.join(timeout=0.5):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                raise AssertionError(f"{worker.__name__}: ranks still running after {timeout} s")
        return [torch.load(f"{out_dir}/{rank}.pt") for rank in range(world)]


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, out_dir: str, worker, args) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    # Imported before the default group exists: torch.distributed.nn.functional binds
    # ``group.WORLD`` as its functions' default argument when it is first imported, and imported
    # under a live group (DTensor's first use imports it, through torch._dynamo and FSDP) it kept
    # that group alive past destroy_process_group. Its gloo worker threads then outlived it into
    # interpreter finalisation, where one that released its last collective's tensors could not
    # take the GIL and was ended by std::terminate (SIGABRT, "terminate called without an active
    # exception"), now and then.
    import torch.distributed.nn

    torch.set_num_threads(1)  # several ranks share a few cores
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    try:
        torch.save(worker(rank, world, *args), f"{out_dir}/{rank}.pt")
        # Every rank past its last collective before any tears the group down (rank 0 hosts
        # its store), so that no rank's last collective meets a closed connection.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def chi_square_pvalue(counts: Tensor, probs: Tensor, min_expected: float = 5.0) -> float:
    """p-value of Pearson's chi-square test that ``counts`` ``[V]`` were drawn from ``probs``
    ``[V]``. Categories expected fewer than ``min_expected`` times are pooled into one, so the
    chi-square approximation holds."""
    expected = probs.double() * counts.sum().double()
    counts = counts.double()
    small = expected < min_expected
    observed = torch.cat([counts[~small], counts[small].sum()[None]])
    expected = torch.cat([expected[~small], expected[small].sum()[None]])
    if expected[-1] == 0:
        observed, expected = observed[:-1], expected[:-1]
    statistic = ((observed - expected).square() / expected).sum()
    dof = observed.numel() - 1
    if dof == 0:
        return 1.0
    return torch.special.gammaincc(torch.tensor(dof / 2.0), statistic / 2.0).item()


def tiny_llama_config(vocab: int, layers: int = 2, hidden: int = 32, **overrides):
    """A tiny untied Llama config (4 heads, 2 key-value heads) for model-level tests;
    ``overrides`` replace or add config fields."""
    from transformers import LlamaConfig

    fields = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    return LlamaConfig(**{**fields, **overrides})


def training_arguments(output_dir, **overrides):
    """``transformers.TrainingArguments`` for a deterministic tiny CPU run: micro-batches of 2
    accumulated twice, one SGD step of learning rate 0.5, a log entry per step, no saving or
    reporting; ``overrides`` replace any field."""
    import transformers

    fields = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=1,
        learning_rate=0.5,
        optim="sgd",
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
    )
    return transformers.TrainingArguments(**{**fields, **overrides})


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run on one thread: on a shared, oversubscribed machine two OpenMP threads wait
    on each other at every op and a tiny forward takes seconds instead of milliseconds."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class MaskedHead(NamedTuple):
    """A head whose bias is -inf on the tokens not in ``kept``; ``tokens = kept[position]``."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor
    kept: Tensor
    position: Tensor
    advantages: Tensor


def infinite_bias_head(masked: str | int) -> MaskedHead:
    """12 rows, D = 32, V = 900 at temperature 0.1 (see ``logprob_step``), where 94% of the
    logits lie more than 87 below their row's maximum and fp32 exp underflows. ``masked``:
    ``"scattered"`` masks a random 20% of the tokens, an int that many leading ones."""
    g = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(12, 32, generator=g), torch.randn(900, 32, generator=g)
    kept = (torch.rand(900, generator=g) > 0.2).nonzero().squeeze(1)
    if masked != "scattered":
        kept = torch.arange(masked, 900)
    position = torch.randint(0, kept.numel(), (12,), generator=g)
    advantages = torch.randn(12, generator=g)
    bias = torch.full((900,), -torch.inf).index_fill_(0, kept, 0.0)
    return MaskedHead(hidden, weight, bias, kept, position, advantages)


def logprob_step(fn, hidden, weight, tokens, advantages, device, **kwargs) -> list[Tensor]:
    """``fn``'s log-probs and entropy at temperature 0.1 and the gradients of hidden and weight
    of ``sum(advantages * logprobs) + sum(entropy)``, computed on ``device``, returned on CPU."""
    h, w = (t.to(device, copy=True).requires_grad_() for t in (hidden, weight))
    logp, entropy = fn(h, w, tokens.to(device), temperature=0.1, return_entropy=True, **kwargs)
    ((advantages.to(device, h.dtype) * logp).sum() + entropy.sum()).backward()
    return [t.cpu() for t in (logp, entropy, h.grad, w.grad)]


def assert_matches_kept_vocabulary(ours: list[Tensor], head: MaskedHead) -> None:
    """``ours`` (``logprob_step``'s four results over the whole head) as accurate as the naive
    computation over the kept tokens only, against fp64; the masked tokens' weight gradient 0."""
    import chunklogits as cl

    args = (head.position, head.advantages, torch.device("cpu"))
    naive = logprob_step(cl.reference.token_logprobs, head.hidden, head.weight[head.kept], *args)
    exact = logprob_step(
        cl.reference.token_logprobs, head.hidden.double(), head.weight[head.kept].double(), *args
    )
    names = ["logprobs", "entropy", "hidden grad", "kept weight grad"]
    kept_grad = ours[3][head.kept]
    for name, o, n, e in zip(names, (*ours[:3], kept_grad), naive, exact, strict=True):
        assert_as_accurate(o, n, e, torch.float32, name)
    dropped = torch.ones(len(head.bias), dtype=torch.bool).index_fill_(0, head.kept, False)
    assert ours[3][dropped].abs().max() < 1e-30


def check_infinite_bias_mask(masked: str | int, device: torch.device) -> None:
    """Log-probs, entropy and their gradients under a bias of -inf on some tokens, computed on
    ``device`` with 7 shards, equal the reference over the vocabulary without those tokens."""
    import chunklogits as cl

    head = infinite_bias_head(masked)
    tokens = head.kept[head.position]
    ours = logprob_step(
        cl.token_logprobs, head.hidden, head.weight, tokens, head.advantages, device,
        bias=head.bias.to(device), shards=7,
    )  # fmt: skip
    assert_matches_kept_vocabulary(ours, head)
