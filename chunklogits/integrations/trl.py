"""TRL: the per-token log-probs, entropy and metrics of TRL's trainers through chunklogits.

TRL 1.16's SFT, DPO, GRPO, RLOO and KTO trainers never read a model's logits for their loss. After
``Trainer.__init__`` each one replaces the ``forward`` of its model (and reference model) with the
one ``trl.trainer.utils.add_fused_lm_head`` builds: called with ``fused_lm_head=True``, it runs the
backbone and hands ``lm_head.weight`` straight to TRL's own chunked kernel; without it, it calls
the forward it replaced. The fused path calls neither the output module nor that forward, so a
model wrapped by ``ChunkedLMHead.wrap`` and handed to a trainer trains through TRL's kernel (with
the wrapped head's Parameters, so correctly, but not through chunklogits): nothing a model carries
is reached there short of patching TRL. ``use_chunklogits(trainer)`` is the one call that reaches
it: it puts a forward with the same contract in place of TRL's, on the same models, with the
options TRL installed (temperature, requested outputs) read from TRL's forward.

What TRL 1.16's fused head can be asked for (``add_fused_lm_head(outputs=...)``, the fields of
``trl.trainer.utils.FusedCausalLMOutput``), all reproduced here: ``log_probs`` (always; its
negative mean is ``loss``), ``entropy`` (differentiable), ``log_sum_sq_probs`` (DPO's
``use_weighting``, no gradient), ``mean_logits`` (no gradient) and ``is_top1``, with
``label_mask``; and, for a MoE model called with ``output_router_logits`` (or whose config sets
it), ``aux_loss``, the router load-balancing loss, added to ``loss`` times the config's
``router_aux_loss_coef`` (DPO and GRPO add their own ``router_aux_loss_coef * aux_loss``).

TRL's ``GKDTrainer`` (``trl.experimental.gkd``) reads both models' full logits in its
``compute_loss``; ``use_chunklogits`` replaces that loss with ``chunklogits.linear_jsd`` of the
student's and the teacher's last hidden states.

Nothing here is imported by ``import chunklogits``; this module imports TRL when it is used.
"""

from __future__ import annotations

import functools
import sys
import types
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from .._blocks import _check_count, plan_blocks, row_stats
from .._checks import check_head, check_in_vocab, make_transform
from ..distill import linear_jsd
from ..head import ChunkedLMHead
from ..sampling import sample_next
from .transformers import _peft_layer_kind, logit_transform

# What TRL's fused forward keeps from ``add_fused_lm_head``'s arguments and the model's config
# (the names of its closure cells in TRL 1.16), and the per-token outputs it may be asked for.
_TRL_CELLS = (
    "original_forward",
    "backbone_attr",
    "temperature",
    "cast_lm_head_to_fp32",
    "outputs",
    "final_logit_softcapping",
    "logit_scale",
)
_SUPPORTED_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


@dataclass(frozen=True)
class _FusedOptions:
    """How ``fused_lm_head=True`` computes: TRL's options plus chunklogits' shard count."""

    backbone_attr: str
    temperature: float
    outputs: tuple[str, ...]
    softcap: float | None
    logit_scale: float | None
    shards: int | None


def use_chunklogits(trainer, *, shards: int | None = None):
    """Make a TRL trainer compute its per-token log-probs, entropy and metrics (and GKD's loss)
    with chunklogits, in place; returns ``trainer``. Call it after constructing the trainer,
    before ``train()``::

        trainer = GRPOTrainer(model=model, reward_funcs=..., args=..., train_dataset=...)
        chunklogits.integrations.trl.use_chunklogits(trainer)
        trainer.train()

    For the trainer's model (the base model of a PEFT model) and its ``ref_model``, where TRL
    installed its fused LM head (``trl.trainer.utils.add_fused_lm_head``), the fused forward is
    replaced by one with the same contract: ``model(..., labels=labels, fused_lm_head=True)``
    returns TRL's ``FusedCausalLMOutput`` (``log_probs``, ``entropy``, ``log_sum_sq_probs``,
    ``mean_logits``, ``is_top1`` as TRL was asked for, 0 where the label is -100; ``loss`` the
    negative log-likelihood summed over the labelled tokens and divided by
    ``num_items_in_batch`` or their count, plus ``router_aux_loss_coef * aux_loss`` for a MoE
    model asked for its router logits; ``label_mask``; ``aux_loss``), at TRL's temperature;
    without ``fused_lm_head`` the forward TRL replaced runs (generation, evaluation). Naive
    equivalent, per labelled position::

        z = transform(lm_head(hidden[:, :-1]).float()) / temperature      # [.., V]
        log_probs = z.log_softmax(-1).gather(-1, labels[:, 1:, None]).squeeze(-1)
        entropy = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)
        log_sum_sq_probs = z.softmax(-1).square().sum(-1).log()
        mean_logits = z.mean(-1);  is_top1 = z.argmax(-1) == labels[:, 1:]
        aux_loss = load_balancing_loss_func(router_logits, num_experts, top_k, attention_mask)

    computed with ``row_stats`` (one pass over the vocabulary, differentiable ``log_probs`` and
    ``entropy``); ``log_sum_sq_probs`` as ``logsumexp(2 z) - 2 logsumexp(z)``, a second
    ``row_stats`` pass at half the temperature without gradient; ``is_top1`` a greedy
    ``sample_next`` pass without gradient. The head runs in its weight's dtype, outside
    autocast: under ``bf16=True`` with an fp32 model the values are fp32-accurate (TRL's kernel
    would run the head in bf16).

    For TRL's ``GKDTrainer``, ``compute_loss`` becomes GKDTrainer's own loss without either
    model's logits: the student's and the teacher's backbones run on the batch (the teacher in
    eval mode, without gradient, inside the student wrapper's forward as TRL's
    ``DistillationTrainer`` runs its chunked loss), and ``chunklogits.linear_jsd`` of their last
    hidden states through their output layers, with the trainer's ``beta``, temperature 1 (as
    ``GKDTrainer.compute_loss``), the labels shifted by one and ``num_items_in_batch``; naive
    equivalent ``GKDTrainer.generalized_jsd_loss(student_logits[:, :-1], teacher_logits[:, :-1],
    labels[:, 1:], beta=beta, num_items_in_batch=num_items_in_batch)``. On-policy (``lmbda``)
    and sequence-level (``seq_kd``) generation stay TRL's ``generate``; ``compute_loss(...,
    return_outputs=True)`` (evaluation that wants the logits) stays GKDTrainer's own.

    Args:
        trainer: a ``trl`` trainer (SFT, DPO, GRPO, RLOO, KTO, or
            ``trl.experimental.gkd.GKDTrainer``) after ``__init__``.
        shards: vocabulary shards per pass, as in ``ChunkedLMHead``; None takes the count of a
            ``ChunkedLMHead.wrap``-ped model's head, else picks it from the block budget.

    Raises ``ValueError`` naming the model when none has TRL's fused head, or when it asks for
    something not reproduced here: a logit transform that chunklogits reads differently from
    TRL, a DTensor (FSDP2) or DeepSpeed ZeRO-3 sharded head; for GKD, a trainer class that
    overrides ``compute_loss``, a model with a logit transform (softcap, logit scale: not taken
    by ``linear_jsd``), an output layer that is not a plain ``nn.Linear`` (a PEFT adapter on the
    head), prompt-learning PEFT, DTensor or ZeRO-3 heads.
    """
    gkd = _gkd_loss_options(trainer, shards)  # checked before anything is replaced
    found = []
    for role, model in (
        ("model", trainer.model),
        ("ref_model", getattr(trainer, "ref_model", None)),
    ):
        if model is None:
            continue
        target = model.get_base_model() if _is_peft(model) else model
        if getattr(target.forward, "_chunklogits_fused", None) is not None:
            found.append(role)  # already ours (a second call)
            continue
        cells = _trl_fused_cells(target)
        if cells is not None:
            _install(target, cells, shards, role)
            found.append(role)
    if gkd is not None:
        trainer.compute_loss = types.MethodType(functools.partial(_gkd_compute_loss, gkd), trainer)
        found.append("compute_loss")
    if not found:
        raise ValueError(
            f"trainer: expected a TRL trainer whose model has TRL's fused LM head "
            f"(trl.trainer.utils.add_fused_lm_head), got a {type(trainer).__name__} without one"
        )
    return trainer


def _is_peft(model: nn.Module) -> bool:
    from accelerate.utils import is_peft_model

    return is_peft_model(model)


def _trl_fused_cells(model: nn.Module) -> dict | None:
    """The closure of TRL's fused forward installed on ``model``, or None if it has none."""
    forward = model.__dict__.get("forward")
    function = getattr(forward, "__func__", None)
    # functools.wraps gave it the class forward's names; its code and module are TRL's.
    if (
        function is None
        or function.__code__.co_name != "_fused_forward"
        or function.__globals__.get("__name__") != "trl.trainer.utils"
    ):
        return None
    cells = dict(
        zip(
            function.__code__.co_freevars,
            (cell.cell_contents for cell in function.__closure__ or ()),
            strict=True,
        )
    )
    missing = [name for name in _TRL_CELLS if name not in cells]
    if missing:
        import trl

        raise ValueError(
            f"trl {trl.__version__}: its fused LM head no longer keeps {missing}; "
            "chunklogits.integrations.trl reads the options of TRL 1.16's add_fused_lm_head"
        )
    return cells


def _install(model: nn.Module, cells: dict, shards: int | None, role: str) -> None:
    name = f"{role} ({type(model).__name__})"
    unsupported = [output for output in cells["outputs"] if output not in _SUPPORTED_OUTPUTS]
    if unsupported:
        raise ValueError(
            f"{name}: TRL asks its fused LM head for {unsupported}, which chunklogits does not "
            f"compute (it computes {list(_SUPPORTED_OUTPUTS)})"
        )
    head = model.get_output_embeddings()
    if isinstance(head.weight, DTensor):
        raise ValueError(
            f"{name}: its output layer's weight is a DTensor (FSDP2 or tensor parallelism), "
            "which chunklogits' fused LM head for TRL does not gather"
        )
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        raise ValueError(
            f"{name}: DeepSpeed ZeRO-3 partitions the output layer's weight, which chunklogits' "
            "fused LM head for TRL does not gather"
        )
    wrapped = isinstance(head, ChunkedLMHead)
    if shards is None and wrapped:
        shards = head.shards
    _check_count("shards", shards, 1, head.weight.shape[0])
    # The transform chunklogits reads (a wrapped model's head carries it) must be TRL's.
    transform = (
        {"softcap": head.softcap, "logit_scale": head.logit_scale}
        if wrapped
        else logit_transform(model.config)
    )
    trl_scale = None if cells["logit_scale"] == 1.0 else cells["logit_scale"]
    theirs = {"softcap": cells["final_logit_softcapping"], "logit_scale": trl_scale}
    if transform != theirs:
        raise ValueError(
            f"{name}: TRL applies the logit transform {theirs}, chunklogits reads {transform} "
            "from the config; refusing rather than computing other log-probs"
        )
    options = _FusedOptions(
        backbone_attr=cells["backbone_attr"],
        temperature=cells["temperature"],
        outputs=tuple(cells["outputs"]),
        shards=shards,
        **transform,
    )
    original_forward = cells["original_forward"]

    # TRL's contract and the class forward's signature (generate() validates its kwargs with it).
    @functools.wraps(type(model).forward)
    def fused_forward(
        self,
        *args,
        fused_lm_head=False,
        labels=None,
        shift_labels=None,
        num_items_in_batch=None,
        **kwargs,
    ):
        if not fused_lm_head:
            for key, value in (
                ("labels", labels),
                ("shift_labels", shift_labels),
                ("num_items_in_batch", num_items_in_batch),
            ):
                if value is not None:
                    kwargs[key] = value
            return original_forward(*args, **kwargs)
        return _fused_outputs(self, options, args, kwargs, labels, shift_labels, num_items_in_batch)

    fused_forward._chunklogits_fused = options
    model.forward = types.MethodType(fused_forward, model)


def _fused_outputs(model, options, args, kwargs, labels, shift_labels, num_items_in_batch):
    """TRL's ``FusedCausalLMOutput`` of one fused forward, the head computed by chunklogits."""
    from trl.trainer.utils import FusedCausalLMOutput

    kwargs["use_cache"] = False
    text_config = model.config.get_text_config()
    # MoE models: router logits when the config asks for them, as the model's own forward does.
    if getattr(text_config, "output_router_logits", False):
        kwargs.setdefault("output_router_logits", True)
    backbone = getattr(model, options.backbone_attr)(*args, **kwargs)
    hidden = backbone.last_hidden_state
    # Position t predicts labels[t + 1] unless the caller shifted them (context parallelism).
    if shift_labels is None:
        hidden, targets = hidden[:, :-1], labels[:, 1:]
    else:
        targets = shift_labels
    head = model.get_output_embeddings()
    weight, bias = head.weight, head.bias
    targets = targets.to(weight.device)
    mask = targets != -100
    # Outside autocast, in the weight's dtype: values at the head's precision (fp32 for an fp32
    # head under bf16 autocast, or one that cast_lm_head_to_fp32 made fp32).
    with torch.autocast(weight.device.type, enabled=False):
        rows = hidden.to(weight.device, weight.dtype)[mask]
        per_token = _per_token(rows, weight, bias, targets[mask], options)
    fields = {}
    for key, values in per_token.items():
        fields[key] = values.new_zeros(mask.shape).masked_scatter(mask, values)
    count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    loss = -fields["log_probs"].sum() / count
    if rows.shape[0] == 0:
        # No labelled token: a zero that still reaches the head and the backbone, as TRL's does,
        # so that backward() works and the optimizer sees zero gradients.
        reach = rows.sum() + weight.sum() + (0.0 if bias is None else bias.sum())
        loss = loss + 0.0 * reach
    aux_loss = None
    if kwargs.get("output_router_logits"):
        aux_loss = _router_aux_loss(
            text_config, backbone.router_logits, kwargs.get("attention_mask")
        )
        loss = loss + getattr(text_config, "router_aux_loss_coef", 0.0) * aux_loss
    return FusedCausalLMOutput(loss=loss, label_mask=mask, aux_loss=aux_loss, **fields)


def _router_aux_loss(text_config, router_logits, attention_mask) -> Tensor:
    """The MoE load-balancing loss of the backbone's router logits, as TRL's fused forward (and
    every transformers MoE family) computes it: Mixtral's ``load_balancing_loss_func``."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    return load_balancing_loss_func(
        router_logits, text_config.num_experts, text_config.num_experts_per_tok, attention_mask
    )


def _per_token(rows: Tensor, weight: Tensor, bias, targets: Tensor, options) -> dict[str, Tensor]:
    """The requested per-token fields of the labelled rows ``[N, D]`` with labels ``[N]``."""
    check_head(rows, weight, bias)
    vocab = weight.shape[0]
    check_in_vocab("labels", targets, vocab, ignore_index=-100)
    if rows.shape[0] == 0:
        empty = rows.new_zeros(0, dtype=torch.promote_types(rows.dtype, torch.float32))
        fields = {"log_probs": empty, "is_top1": empty.bool()}
        fields.update({key: empty for key in ("entropy", "log_sum_sq_probs", "mean_logits")})
        return {
            key: fields[key]
            for key in _SUPPORTED_OUTPUTS
            if key == "log_probs" or key in options.outputs
        }
    transform = make_transform(options.softcap, options.logit_scale, options.temperature)
    plan = plan_blocks(
        rows.shape[0], vocab, rows.dtype, rows.device, shards=options.shards, dim=rows.shape[1]
    )
    stats = row_stats(
        rows,
        weight,
        bias,
        targets=targets,
        transform=transform,
        plan=plan,
        want_mean="mean_logits" in options.outputs,
        want_entropy="entropy" in options.outputs,
    )
    fields = {"log_probs": stats.logprob}
    if stats.entropy is not None:
        fields["entropy"] = stats.entropy
    if "log_sum_sq_probs" in options.outputs:
        # log sum_v p_v^2 = logsumexp(2 z) - 2 logsumexp(z): a log-sum-exp at half the temperature.
        # Without gradient, as TRL's (DPO's WPO weights read it under no_grad).
        with torch.no_grad():
            doubled = row_stats(
                rows.detach(),
                weight.detach(),
                None if bias is None else bias.detach(),
                transform=replace(transform, temperature=options.temperature / 2),
                plan=plan,
            )
        # The maxima first (2 m up to rounding): no cancellation of the two lse near 0.
        offset = doubled.max - 2 * stats.max
        fields["log_sum_sq_probs"] = offset + (doubled.log_sum - 2 * stats.log_sum.detach())
    if stats.mean is not None:
        fields["mean_logits"] = stats.mean.detach()  # TRL's is a metric without gradient
    if "is_top1" in options.outputs:
        # The first maximum, as TRL's kernel and torch.argmax take it; temperature does not move it.
        with torch.no_grad():
            argmax = sample_next(
                rows,
                weight,
                bias=bias,
                softcap=options.softcap,
                logit_scale=options.logit_scale,
                shards=options.shards,
                do_sample=False,
            )
        fields["is_top1"] = argmax == targets
    return fields


# --- GKDTrainer (trl.experimental.gkd): its loss through linear_jsd ---------------------------


@dataclass(frozen=True)
class _GKDOptions:
    """How the GKD loss is computed: chunklogits' shard count (TRL's beta is read per call)."""

    shards: int | None


def _gkd_loss_options(trainer, shards: int | None) -> _GKDOptions | None:
    """``_GKDOptions`` for a ``GKDTrainer`` whose loss chunklogits can compute, None for another
    trainer (or one already switched); ``ValueError`` for a GKD setup it does not reproduce."""
    # A GKDTrainer's module is imported already; importing it here would import trl.experimental.
    module = sys.modules.get("trl.experimental.gkd.gkd_trainer")
    if module is None or not isinstance(trainer, module.GKDTrainer):
        return None
    if getattr(trainer.compute_loss, "func", None) is _gkd_compute_loss:
        return None  # already ours (a second call)
    if type(trainer).compute_loss is not module.GKDTrainer.compute_loss:
        raise ValueError(
            f"trainer: {type(trainer).__name__} overrides GKDTrainer.compute_loss; "
            "chunklogits reproduces GKDTrainer's own loss only"
        )
    student = _causal_lm(trainer.accelerator.unwrap_model(trainer.model))
    teacher = _causal_lm(trainer.accelerator.unwrap_model(trainer.teacher_model))
    for role, model in (("model", student), ("teacher_model", teacher)):
        name = f"{role} ({type(model).__name__})"
        transform = logit_transform(model.config)
        if transform != {"softcap": None, "logit_scale": None}:
            raise ValueError(
                f"{name}: its logits are transformed ({transform}), which chunklogits.linear_jsd "
                "does not apply"
            )
        head = model.get_output_embeddings()
        if not isinstance(head, nn.Linear) or _peft_layer_kind(head) is not None:
            raise ValueError(
                f"{name}: its output layer is a {type(head).__name__}; chunklogits' GKD loss "
                "reads an nn.Linear's weight and bias (not a PEFT adapter on the head)"
            )
        if isinstance(head.weight, DTensor):
            raise ValueError(
                f"{name}: its output layer's weight is a DTensor (FSDP2 or tensor parallelism), "
                "which chunklogits' GKD loss does not gather"
            )
    config = getattr(trainer.accelerator.unwrap_model(trainer.model), "active_peft_config", None)
    if getattr(config, "is_prompt_learning", False):
        raise ValueError(
            "model: prompt-learning PEFT adds virtual tokens in PeftModel.forward, which "
            "chunklogits' GKD loss (run on the backbone) does not"
        )
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        raise ValueError(
            "model: DeepSpeed ZeRO-3 partitions the output layers' weights, which chunklogits' "
            "GKD loss does not gather"
        )
    head = student.get_output_embeddings()
    if shards is None and isinstance(head, ChunkedLMHead):
        shards = head.shards
    _check_count("shards", shards, 1, head.weight.shape[0])
    return _GKDOptions(shards=shards)


def _causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT model (LoRA layers in place), else ``model``."""
    return model.get_base_model() if _is_peft(model) else model


def _gkd_compute_loss(
    options: _GKDOptions, self, model, inputs, return_outputs=False, num_items_in_batch=None
):
    """``GKDTrainer.compute_loss`` with the loss from ``linear_jsd``; with ``return_outputs``
    (evaluation that wants the logits) GKDTrainer's own, which returns the student's logits."""
    if return_outputs:
        return type(self).compute_loss(self, model, inputs, True, num_items_in_batch)
    from trl.models.utils import _ForwardRedirection

    # Run inside the student wrapper's forward (DDP's gradient synchronisation hooks on it), as
    # TRL's DistillationTrainer runs its chunked loss.
    student = self.accelerator.unwrap_model(model)
    return _ForwardRedirection()(
        model, student, _gkd_loss, self, student, inputs, num_items_in_batch, options
    )


def _gkd_loss(trainer, student, inputs, num_items_in_batch, options: _GKDOptions) -> Tensor:
    """GKDTrainer's generalised JSD (its beta, temperature 1, labels shifted by one) of the
    student's and the teacher's last hidden states through their output layers."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    student = _causal_lm(student)
    student_hidden = _last_hidden_state(student, ids, mask)
    trainer.teacher_model.eval()
    teacher = _causal_lm(trainer.accelerator.unwrap_model(trainer.teacher_model))
    with torch.no_grad():
        teacher_hidden = _last_hidden_state(teacher, ids, mask)
    student_head, teacher_head = student.get_output_embeddings(), teacher.get_output_embeddings()
    weight = student_head.weight
    # Outside autocast, both heads in the student weight's dtype (as the fused forward above).
    with torch.autocast(weight.device.type, enabled=False):
        cast = functools.partial(_to, device=weight.device, dtype=weight.dtype)
        return linear_jsd(
            cast(student_hidden),
            weight,
            cast(teacher_hidden),
            cast(teacher_head.weight),
            inputs["labels"].to(weight.device),
            beta=trainer.beta,
            shift=True,  # position t predicts token t + 1, as GKDTrainer.compute_loss shifts
            student_bias=student_head.bias,
            teacher_bias=cast(teacher_head.bias),
            num_items_in_batch=num_items_in_batch,
            shards=options.shards,
        )


def _last_hidden_state(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """The backbone's last hidden states, ``[B, T, D]`` (TRL's fused head runs the same)."""
    return model.base_model(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False
    ).last_hidden_state


def _to(tensor: Tensor | None, device, dtype) -> Tensor | None:
    return None if tensor is None else tensor.to(device, dtype)
