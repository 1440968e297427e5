"""What the main job (``python -m chunklogits``) and ``bench/`` measure: the ways a causal LM's last
layer is used — as transformers did at the time of issue #30860, as transformers 5.x does, as RL
trainers do, and with chunklogits — each run on the same model and inputs, timed, and measured
with ``chunklogits.memory.peak()``.

A *task* is one thing a user does with the logits (``prefill``: the first forward pass of
``generate()``; ``logprobs``: per-token log-probs and entropy for scoring or an RL reference
model; ``loss``: a training step; ``sampling``: one decoding step for a batch of sequences). Each
task has cases, the ways of doing it; the first case of a task is the most precise baseline (its
fp32 answer is what the others are compared with) and the case named ``"chunklogits"`` is ours.
Every case returns its answer (the greedy next token, the log-probs and entropies, the loss, the
sampled tokens), so that the report can show that they agree.

Nothing here downloads: models are built from a preset shape with random weights, or loaded from
a local directory or ``config.json``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import memory, reference
from .integrations.transformers import check_head_reproduced, logit_transform
from .logprobs import token_logprobs
from .loss import linear_cross_entropy
from .sampling import sample_next


class Preset(NamedTuple):
    """The shape of a public checkpoint (its config.json on the Hugging Face Hub)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    tie_word_embeddings: bool
    extra: dict

    def config_kwargs(self) -> dict:
        kwargs = self._asdict()
        del kwargs["model_type"], kwargs["extra"]
        return {**kwargs, **self.extra}


_LLAMA3_ROPE = {"rope_theta": 500000.0}
PRESETS: dict[str, Preset] = {
    "llama3-1b": Preset("llama", 128256, 2048, 8192, 32, 8, True, _LLAMA3_ROPE),  # Llama-3.2-1B
    "llama3-8b": Preset("llama", 128256, 4096, 14336, 32, 8, False, _LLAMA3_ROPE),  # Llama-3-8B
    "mistral-7b": Preset("mistral", 32000, 4096, 14336, 32, 8, False, {}),  # Mistral-7B-v0.1
    "gemma-7b": Preset("gemma", 256000, 3072, 24576, 16, 16, True, {"head_dim": 256}),  # gemma-7b
}

# The sequence lengths of the seed issue's figures: 100, 500, 1000, ..., 6500 tokens.
SEED_SIZES = (100, *range(500, 6501, 500))

# One decoding step samples as a typical generation config does.
SAMPLING = dict(temperature=0.7, top_k=50, top_p=0.9)

# Sizes of the warm-up run and of the two runs that anchor the memory guard's extrapolation.
_ANCHORS = (16, 32)


@dataclass
class Workload:
    """A causal LM split where chunklogits takes over: ``base`` (the decoder, returning the last
    hidden states) and the output layer ``head`` (``weight [V, D]``, ``bias [V]`` or None),
    whose logits the model transforms as its config says (``softcap``, ``logit_scale``:
    ``integrations.transformers.logit_transform``)."""

    model: nn.Module
    shards: int | None = None
    base: nn.Module = field(init=False)
    head: nn.Module = field(init=False)
    transform: dict = field(init=False)

    def __post_init__(self):
        self.base = self.model.get_decoder()
        self.head = self.model.get_output_embeddings()
        if self.head is None or not isinstance(getattr(self.head, "weight", None), Tensor):
            raise ValueError(
                f"model: expected a causal LM with an output layer, got {type(self.model).__name__}"
            )
        self.transform = logit_transform(self.model.config)

    @property
    def weight(self) -> Tensor:
        return self.head.weight

    @property
    def bias(self) -> Tensor | None:
        return getattr(self.head, "bias", None)

    @property
    def device(self) -> torch.device:
        return self.weight.device

    @property
    def vocab(self) -> int:
        return self.weight.shape[0]

    def hidden(self, ids: Tensor, use_cache: bool) -> Tensor:
        """``[B, T, D]`` last hidden states: what the output layer is applied to."""
        return self.base(ids, use_cache=use_cache).last_hidden_state

    def logits(self, hidden: Tensor) -> Tensor:
        """fp32 logits as the model defines them: ``transform(head(hidden).float())``."""
        return reference.logits(hidden, self.weight, bias=self.bias, **self.transform)

    def check_head(self) -> None:
        """Refuse a model whose logits are not ``logits(hidden)`` (a forward hook, a transform
        its config does not declare, an output layer fed something else than the decoder's
        last hidden state): the chunklogits cases would compute something else. The check is
        ``cl.sample``'s (``integrations.transformers.check_head_reproduced``)."""
        check_head_reproduced(self.model, self.base, caller="chunklogits bench", **self.transform)

    def tokens(self, batch: int, length: int, seed: int = 0) -> Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, self.vocab, (batch, length), generator=g).to(self.device)


# ---------------------------------------------------------------------------------------------
# Baselines written after the code they stand for (not imported: those packages are optional).


def selective_log_softmax(logits: Tensor, index: Tensor) -> Tensor:
    """TRL's ``selective_log_softmax`` (trl/trainer/utils.py) on half-precision logits: one
    sequence's ``log_softmax`` at a time, in the logits' dtype, then the gather."""
    rows = zip(logits, index, strict=True)
    return torch.stack([row.log_softmax(-1).gather(-1, i[:, None]).squeeze(-1) for row, i in rows])


def entropy_from_logits(logits: Tensor, chunk_size: int = 128) -> Tensor:
    """TRL's ``entropy_from_logits`` (trl/trainer/utils.py): ``chunk_size`` flattened rows at a
    time, in the logits' dtype."""
    flat = logits.reshape(-1, logits.shape[-1])
    parts = []
    for chunk in flat.split(chunk_size):
        logp = chunk.log_softmax(-1)
        parts.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(parts).reshape(logits.shape[:-1])


def verl_entropy_from_logits(logits: Tensor) -> Tensor:
    """verl's ``entropy_from_logits`` (verl/utils/torch_functional.py): the softmax, then
    ``logsumexp(z) - sum(p * z)``, in the logits' dtype. (verl's log-probs without flash-attn,
    ``logprobs_from_logits_v2``, are ``selective_log_softmax`` above.)"""
    p = logits.softmax(-1)
    return logits.logsumexp(-1) - (p * logits).sum(-1)


# ---------------------------------------------------------------------------------------------
# The cases. Each takes the workload and the task's inputs and returns its answer.


def _prefill_upcast(w: Workload, ids: Tensor) -> Tensor:
    # transformers <= 4.45 (issue #30860): ``logits = self.lm_head(hidden_states).float()``;
    # generate() then takes the last row's argmax (greedy decoding).
    logits = w.model(ids, use_cache=True).logits.float()
    return logits[:, -1].argmax(-1)


def _prefill_half(w: Workload, ids: Tensor) -> Tensor:
    return w.model(ids, use_cache=True).logits[:, -1].float().argmax(-1)


def _prefill_keep_last(w: Workload, ids: Tensor) -> Tensor:
    return w.model(ids, use_cache=True, logits_to_keep=1).logits[:, -1].float().argmax(-1)


def _prefill_chunklogits(w: Workload, ids: Tensor) -> Tensor:
    # chunklogits.sample's prefill: the decoder's hidden states, then the next token drawn from
    # the last one block by block.
    hidden = w.hidden(ids, use_cache=True)
    return sample_next(
        hidden[:, -1], w.weight, bias=w.bias, shards=w.shards, do_sample=False, **w.transform
    )


def _logprobs_upcast(w: Workload, ids: Tensor) -> Tensor:
    logits = w.model(ids, use_cache=False).logits[:, :-1].float()
    logp = logits.log_softmax(-1)
    picked = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    return torch.stack([picked, -(logp.exp() * logp).sum(-1)])


def _logprobs_trl(w: Workload, ids: Tensor) -> Tensor:
    logits = w.model(ids, use_cache=False).logits[:, :-1]
    picked = selective_log_softmax(logits, ids[:, 1:])
    return torch.stack([picked.float(), entropy_from_logits(logits).float()])


def _logprobs_chunklogits(w: Workload, ids: Tensor) -> Tensor:
    hidden = w.hidden(ids, use_cache=False)[:, :-1]
    logp, entropy = token_logprobs(
        hidden,
        w.weight,
        ids[:, 1:],
        bias=w.bias,
        return_entropy=True,
        shards=w.shards,
        **w.transform,
    )
    return torch.stack([logp, entropy])


def _loss_upcast(w: Workload, ids: Tensor) -> Tensor:
    # transformers <= 4.44's LlamaForCausalLM.forward with labels: upcast, then a shifted copy.
    logits = w.logits(w.hidden(ids, use_cache=False))
    shifted = logits[..., :-1, :].contiguous()
    loss = F.cross_entropy(shifted.view(-1, shifted.shape[-1]), ids[..., 1:].reshape(-1))
    loss.backward()
    return loss.detach()


def _loss_transformers(w: Workload, ids: Tensor) -> Tensor:
    loss = w.model(ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.detach()


def _loss_chunklogits(w: Workload, ids: Tensor) -> Tensor:
    hidden = w.hidden(ids, use_cache=False)
    loss = linear_cross_entropy(
        hidden, w.weight, ids, bias=w.bias, shift=True, shards=w.shards, **w.transform
    )
    loss.backward()
    return loss.detach()


def _sample_transformers(w: Workload, hidden_last: Tensor, prompt: Tensor) -> Tensor:
    # One step of generate()'s sampling loop, with transformers' own warpers.
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    warpers = LogitsProcessorList(
        [
            TemperatureLogitsWarper(SAMPLING["temperature"]),
            TopKLogitsWarper(SAMPLING["top_k"]),
            TopPLogitsWarper(SAMPLING["top_p"]),
        ]
    )
    scores = warpers(prompt, w.logits(hidden_last))
    return torch.multinomial(scores.softmax(-1), 1).squeeze(1)


def _sample_chunklogits(w: Workload, hidden_last: Tensor, prompt: Tensor) -> Tensor:
    return sample_next(
        hidden_last, w.weight, bias=w.bias, shards=w.shards, seed=0, **SAMPLING, **w.transform
    )


@dataclass(frozen=True)
class Case:
    """``head_gemms``: how many ``[tokens, D] x [D, V]`` GEMMs its output layer runs (for
    ``estimate_seconds``; a last-position-only head counts 0)."""

    name: str
    run: Callable[..., Tensor]
    head_gemms: int = 1


@dataclass(frozen=True)
class Task:
    """``cases`` ways of doing one thing; ``size`` is tokens per sequence, or sequences for
    ``sampling``; ``grad``: the cases run backward (a training step); ``compared``: the answers
    are numbers whose difference from the first case's is reported (not token ids)."""

    name: str
    title: str
    size_label: str
    value_label: str
    cases: tuple[Case, ...]
    grad: bool = False
    compared: bool = True


TASKS: dict[str, Task] = {
    "prefill": Task(
        "prefill",
        "Inference prefill: the first forward pass of generate()",
        "tokens",
        "next token",
        (
            Case("transformers 4.40 (fp32 logits)", _prefill_upcast),
            Case("transformers 5.x (half logits)", _prefill_half),
            Case("transformers 5.x generate (logits_to_keep=1)", _prefill_keep_last, 0),
            Case("chunklogits", _prefill_chunklogits, 0),
        ),
        compared=False,
    ),
    "logprobs": Task(
        "logprobs",
        "Per-token log-probs and entropy (scoring, RL reference model), no grad",
        "tokens",
        "mean log-prob",
        (
            Case("log_softmax(logits.float())", _logprobs_upcast),
            Case("TRL selective_log_softmax + entropy_from_logits", _logprobs_trl),
            Case("chunklogits", _logprobs_chunklogits),
        ),
    ),
    "loss": Task(
        "loss",
        "Training step: forward, causal LM loss, backward",
        "tokens",
        "loss",
        (
            Case("transformers 4.40 (fp32 logits + shifted copy)", _loss_upcast, 3),
            Case("transformers 5.x (ForCausalLMLoss)", _loss_transformers, 3),
            Case("chunklogits", _loss_chunklogits, 4),  # the recomputing backward's fourth
        ),
        grad=True,
    ),
    "sampling": Task(
        "sampling",
        "One sampling step (temperature 0.7, top-k 50, top-p 0.9) for a batch of sequences",
        "sequences",
        "",
        (
            Case("transformers generate() warpers", _sample_transformers),
            Case("chunklogits", _sample_chunklogits),
        ),
        compared=False,
    ),
}


def task_inputs(w: Workload, task: Task, size: int, batch: int) -> tuple[Tensor, ...]:
    """The inputs of ``task``'s cases at ``size``: token ids ``[batch, size]``, or for sampling
    the last hidden states ``[size, D]`` of ``size`` short prompts and the prompts."""
    if task.name != "sampling":
        return (w.tokens(batch, size),)
    prompt = w.tokens(size, 4)
    with torch.no_grad():
        return w.hidden(prompt, use_cache=False)[:, -1].contiguous(), prompt


def summary_value(task: Task, answer: Tensor) -> float | None:
    """The number shown in the table's value column for one answer."""
    if task.name == "prefill":
        return float(answer[0])
    if task.name == "logprobs":
        return answer[0].mean().item()
    if task.name == "loss":
        return answer.item()
    return None


# ---------------------------------------------------------------------------------------------
# Measuring.


@dataclass
class Result:
    """One case at one size: ``seconds`` (one run, after a warm-up at a small size),
    ``peak_bytes`` above the level at entry (``memory.peak``), ``value`` (see
    ``summary_value``), ``max_diff`` = max |answer - first case's answer| (tasks whose answers
    are ``compared``),
    ``skipped``: why it was not run."""

    task: str
    case: str
    size: int
    seconds: float | None = None
    peak_bytes: int | None = None
    value: float | None = None
    max_diff: float | None = None
    skipped: str | None = None

    @property
    def peak_mib(self) -> float | None:
        return None if self.peak_bytes is None else self.peak_bytes / 2**20


def available_bytes(device: torch.device) -> int:
    """Memory a new allocation can still get: free CUDA memory, or Linux's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 2**62


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run_case(w: Workload, task: Task, case: Case, inputs: tuple[Tensor, ...]):
    """(seconds, peak bytes, answer) of one run."""
    w.model.zero_grad(set_to_none=True)
    with memory.peak(w.device) as used, torch.set_grad_enabled(task.grad):
        start = time.perf_counter()
        answer = case.run(w, *inputs)
        _synchronize(w.device)
        seconds = time.perf_counter() - start
    w.model.zero_grad(set_to_none=True)
    return seconds, used.bytes, answer.detach()


def run_task(
    w: Workload,
    task: Task,
    sizes: Sequence[int],
    *,
    batch: int = 1,
    headroom: float = 0.85,
    on_step: Callable[[str], None] = lambda description: None,
) -> list[Result]:
    """Run every case of ``task`` at every size, sizes ascending within a case.

    A case is skipped at a size when its predicted peak (``predicted_peak`` from its smaller
    sizes) would exceed ``headroom`` times the memory available (``available_bytes``), and at
    every larger size after that. ``on_step(description)`` is called before each run.
    """
    results: list[Result] = []
    first_answers: dict[int, Tensor] = {}
    for case in task.cases:
        on_step(f"{task.name}: {case.name} (warm-up)")
        _run_case(w, task, case, task_inputs(w, task, _ANCHORS[0], batch))  # lazy initialisations
        # Two small sizes anchor the line along which the peak is extrapolated.
        measured = [
            (size, _run_case(w, task, case, task_inputs(w, task, size, batch))[1])
            for size in _ANCHORS
        ]
        skipped = None
        for size in sorted(sizes):
            on_step(f"{task.name}: {case.name}, {size} {task.size_label}")
            result = Result(task.name, case.name, size)
            results.append(result)
            skipped = skipped or _too_big(measured, size, w.device, headroom)
            if skipped:
                result.skipped = skipped
                continue
            seconds, peak_bytes, answer = _run_case(
                w, task, case, task_inputs(w, task, size, batch)
            )
            result.seconds, result.peak_bytes = seconds, peak_bytes
            measured = sorted({**dict(measured), size: peak_bytes}.items())
            result.value = summary_value(task, answer)
            if case is task.cases[0]:
                first_answers[size] = answer
            if task.compared and size in first_answers:
                reference = first_answers[size].double()
                result.max_diff = (answer.double() - reference).abs().max().item()
    return results


def predicted_peak(measured: Sequence[tuple[int, int]], size: int) -> float:
    """A case's peak bytes at ``size`` from two or more ``(size, peak)`` measurements, ascending
    in size: the line through the last two (fixed costs such as the parameters' gradients are
    its intercept), never below the last measurement."""
    (size0, peak0), (last_size, last_peak) = measured[-2:]
    slope = max(0.0, (last_peak - peak0) / (last_size - size0))
    return last_peak + slope * (size - last_size)


def _too_big(measured, size: int, device: torch.device, headroom: float):
    predicted = predicted_peak(measured, size)
    available = available_bytes(device)
    if predicted > headroom * available:
        return (
            f"not run: needs about {predicted / 2**20:,.0f} MiB "
            f"(extrapolated from {measured[-1][0]}), {available / 2**20:,.0f} MiB available"
        )
    return None


def estimate_seconds(
    w: Workload,
    tasks: Iterable[Task],
    sizes: Sequence[int],
    batches: Sequence[int],
    *,
    batch: int,
    flops_per_second: float,
) -> float:
    """Seconds ``run_task`` would take for ``tasks`` at ``sizes`` (``batches`` for sampling),
    warm-up and anchor runs included, from a count of the GEMM flops of each run at
    ``flops_per_second`` (``gemm_flops_per_second``): the output layer's ``head_gemms`` of
    ``2 T V D`` flops and the decoder's ``2 T x (its weights)`` plus causal attention, three
    times over for a training step (forward and backward), times ``_OVERHEAD`` for the passes
    over the logits and the rest that no GEMM counts."""
    vocab, dim = w.weight.shape
    layers = w.model.config.num_hidden_layers
    embedding = w.model.get_input_embeddings().weight.numel()
    decoder_weights = sum(p.numel() for p in w.base.parameters()) - embedding
    total = 0.0
    for task in tasks:
        runs = (_ANCHORS[0], *_ANCHORS, *(batches if task.name == "sampling" else sizes))
        for size in runs:
            if task.name == "sampling":  # the prompts' forward (4 tokens each), then one row each
                tokens, length, head_tokens = size * 4, 4, size
            else:
                tokens, length, head_tokens = size * batch, size, size * batch
            passes = 3 if task.grad else 1
            decoder = 2 * tokens * (decoder_weights + length * dim * layers)
            head = 2 * head_tokens * vocab * dim
            total += sum(passes * decoder + case.head_gemms * head for case in task.cases)
    return _OVERHEAD * total / flops_per_second


# What ``estimate_seconds`` adds to the GEMMs' time: the passes over full logits of the baselines
# (log_softmax, the fp32 copy...), allocation, the decoder's other work, the job's start-up.
# Measured with the built-in preset on a 2-core AVX2 CPU (fp32, 107 GFLOP/s GEMMs): the whole job
# took 1.7x its GEMM time at 512-2048 tokens and 2.0x at 128-512; the larger keeps it an upper
# bound (docs/benchmarks.md, "The main job").
_OVERHEAD = 2.0


def gemm_flops_per_second(w: Workload) -> float:
    """The rate of a ``[512, D] x [D, min(V, 8192)]`` GEMM in the head's dtype on its device,
    best of three after a warm-up: the speed ``estimate_seconds`` scales by."""
    dim = w.weight.shape[1]
    g = torch.Generator(device=w.device).manual_seed(0)
    new = {"dtype": w.weight.dtype, "device": w.device, "generator": g}
    a = torch.randn(512, dim, **new)
    b = torch.randn(min(w.vocab, 8192), dim, **new)
    best = math.inf
    for _ in range(4):
        _synchronize(w.device)
        start = time.perf_counter()
        a @ b.T
        _synchronize(w.device)
        best = min(best, time.perf_counter() - start)
    return 2 * a.shape[0] * b.shape[0] * dim / best


def count_steps(tasks: Iterable[Task], sizes: Sequence[int], batches: Sequence[int]) -> int:
    """How many times ``run_task`` calls ``on_step`` for these tasks."""
    return sum(len(t.cases) * (1 + len(batches if t.name == "sampling" else sizes)) for t in tasks)


# ---------------------------------------------------------------------------------------------
# Models.


def build_model(
    preset: str | None = None,
    *,
    path: str | os.PathLike | None = None,
    layers: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> nn.Module:
    """A causal LM in eval mode, without downloads: ``preset`` (a key of ``PRESETS``) with random
    weights, or ``path``: a local checkpoint directory (its weights are loaded) or a directory
    or file holding only a ``config.json`` (random weights). ``layers`` overrides the number of
    decoder layers of a model built from a config; a checkpoint keeps its own."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if (preset is None) == (path is None):
        raise ValueError("build_model: expected exactly one of preset and path")
    if layers is not None and (not isinstance(layers, int) or layers < 1):
        raise ValueError(f"layers: expected an int >= 1, got {layers!r}")
    torch.manual_seed(seed)
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {preset!r}")
        shape = PRESETS[preset]
        config = AutoConfig.for_model(
            shape.model_type,
            num_hidden_layers=layers or 2,
            max_position_embeddings=8192,
            **shape.config_kwargs(),
        )
    else:
        path = Path(path)
        if not path.exists():
            raise ValueError(f"model: expected a checkpoint directory or config.json, got {path}")
        if path.is_dir() and _has_weights(path):
            if layers is not None:
                raise ValueError("layers: a checkpoint keeps its own layers; drop --layers")
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
            return model.to(device).eval()
        config_file = path / "config.json" if path.is_dir() else path
        if not config_file.is_file():
            raise ValueError(f"model: expected {config_file} to exist")
        config = AutoConfig.from_pretrained(config_file, local_files_only=True)
        if layers is not None:
            config.num_hidden_layers = layers
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.to(device).eval()


def _has_weights(directory: Path) -> bool:
    patterns = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json")
    return any(next(directory.glob(p), None) is not None for p in patterns)


def parameter_bytes(model: nn.Module) -> int:
    return sum(p.nbytes for p in {id(p): p for p in model.parameters()}.values())


def iter_tasks(names: Iterable[str]) -> Iterator[Task]:
    for name in names:
        if name not in TASKS:
            raise ValueError(f"tasks: expected names from {sorted(TASKS)}, got {name!r}")
        yield TASKS[name]
