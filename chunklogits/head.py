"""``ChunkedLMHead``: an output layer whose loss and log-probs never hold the logits.

The module owns (shares) the output embedding's Parameters, so putting it in place of a model's
``lm_head`` changes neither the ``state_dict`` nor weight tying. Called as a module it is the
``nn.Linear`` it replaces; ``loss`` and ``token_logprobs`` are the chunked ops with the model's
logit transform (softcap, logit scale) and shard count filled in. ``wrap``/``unwrap`` install it in
a transformers ``*ForCausalLM`` (see ``chunklogits.integrations.transformers``).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from ._blocks import _check_count
from ._checks import check_tensor, make_transform
from .distributed import local_head
from .logprobs import TopLogprobs, token_logprobs, topk_logprobs
from .loss import LossOutput, linear_cross_entropy, token_accuracy
from .sampling import NextTokens, sample_next


class ChunkedLMHead(nn.Linear):
    """Output layer ``hidden [..., D] -> logits [..., V]`` with chunked loss and log-probs.

    Args:
        weight: ``[V, D]`` output embedding. A Parameter is kept as is (the same object, so tied
            input/output embeddings stay tied); a leaf tensor becomes a Parameter sharing its
            data; a tensor computed from others (a merged LoRA weight ``W + scale * B @ A``) is
            kept as that tensor, not registered, so that gradients flow back to what it is made
            of.
        bias: ``[V]`` or None, likewise.
        shards: vocabulary shards per pass of the chunked ops, in ``[1, V]``; None picks the count
            from the block budget (``chunklogits.set_block_budget``).
        softcap: Gemma-2/3 ``final_logit_softcapping``: ``z = softcap * tanh(x / softcap)``.
        logit_scale: multiplier of the raw logits (Cohere ``logit_scale``, Granite
            ``1 / logits_scaling``), applied before ``softcap``.

    ``head(hidden)`` is ``F.linear(hidden, weight, bias)`` in the model dtype: exactly the
    ``nn.Linear`` it replaces, *before* the transform (a transformers forward applies the transform
    itself). ``head.loss``, ``head.token_logprobs`` and ``head.sample_next`` apply the transform.

    A weight (and bias) that is a ``DTensor`` sharded on the vocabulary dimension, as
    ``torch.distributed.tensor.parallel.ColwiseParallel`` leaves an ``nn.Linear``'s, makes those
    three vocab-parallel over its mesh's process group (``chunklogits.distributed.local_head``):
    every rank of the group calls them with the same inputs and gets the whole vocabulary's
    result. ``head(hidden)`` is then the parallelised layer's own output (``wrap`` keeps that
    layer, with the input and output layouts its parallel style gives).

    Under ``torch.autocast`` the chunked ops take their operands as ``F.linear`` does there:
    hidden, weight and bias are cast to the autocast dtype (bf16 for ``torch.autocast("cpu")``,
    accelerate's ``mixed_precision="bf16"`` and ``Trainer(bf16=True)``), so the block GEMMs run
    in that dtype (on CPU as ``set_cpu_gemm_dtype`` says) and the statistics, the loss and the
    log-probs stay fp32; the gradients return to the Parameters in their own dtype. The cast
    weight is one ``[V, D]`` copy per call, as autocast makes for the plain ``nn.Linear``.

    The class derives from ``nn.Linear`` so that libraries that adapt linear layers (PEFT's LoRA,
    ``modules_to_save``) accept it; it is built from the given tensors, not initialised.
    """

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor | None = None,
        shards: int | None = None,
        softcap: float | None = None,
        logit_scale: float | None = None,
    ):
        nn.Module.__init__(self)  # nn.Linear's own __init__ would create new Parameters
        check_tensor("weight", weight)
        if weight.dim() != 2 or weight.shape[0] < 1:
            raise ValueError(
                f"weight: expected shape [V, D] with V >= 1, got {tuple(weight.shape)}"
            )
        if bias is not None:
            check_tensor("bias", bias)
            if tuple(bias.shape) != (weight.shape[0],):
                raise ValueError(
                    f"bias: expected shape [V] = [{weight.shape[0]}], got {tuple(bias.shape)}"
                )
        _check_count("shards", shards, 1, weight.shape[0])
        transform = make_transform(softcap, logit_scale)
        self.weight = _as_parameter(weight)
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = _as_parameter(bias)
        self.shards = shards
        self.softcap = transform.softcap
        self.logit_scale = transform.logit_scale
        # With labels, whether a wrapped model also returns the logits (materialising them):
        # True, False, or None for "in eval mode with autograd off" (see ChunkedLMHead.wrap).
        self.return_logits: bool | None = None
        # Set by ``wrap``: what ``unwrap`` restores (see integrations.transformers).
        self._wrapping = None
        # Set by a wrapped model's forward while it runs the original one: what a call of the
        # module runs instead of ``logits`` (a flag read by ``forward``, which torch.compile
        # traces, where swapping the forward method does not).
        self._intercept: Callable[[Tensor], Tensor] | None = None

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, shards={self.shards}, softcap={self.softcap}, "
            f"logit_scale={self.logit_scale}"
        )

    def forward(self, hidden: Tensor) -> Tensor:
        """Plain logits ``F.linear(hidden, weight, bias)``, ``[..., V]`` in the model dtype."""
        if self._intercept is not None:
            return self._intercept(hidden)
        return self.logits(hidden)

    def logits(self, hidden: Tensor) -> Tensor:
        """``forward``'s plain logits, whatever a wrapped model's forward intercepts."""
        if not isinstance(self.weight, DTensor):
            return F.linear(hidden, self.weight, self.bias)
        if self._wrapping is None:
            raise TypeError(
                "weight: a ChunkedLMHead computes plain logits from a DTensor weight only in place "
                "of the parallelised layer (ChunkedLMHead.wrap), whose input and output layouts it "
                "keeps; got a DTensor weight and no such layer"
            )
        return self._wrapping.original_layer(hidden)

    def loss(
        self,
        hidden: Tensor,
        labels: Tensor,
        *,
        ignore_index: int = -100,
        reduction: str = "mean",
        num_items_in_batch: int | Tensor | None = None,
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        shift: bool = False,
        chunk_size: int | None = None,
        class_weight: Tensor | None = None,
        return_z_loss: bool = False,
        return_token_accuracy: bool = False,
        temperature: float | Tensor = 1.0,
    ) -> Tensor | LossOutput:
        """``chunklogits.linear_cross_entropy(hidden, weight, labels, bias=bias, shards=shards,
        softcap=softcap, logit_scale=logit_scale, ...)``: hidden ``[..., D]``, labels and a
        per-position ``temperature`` ``hidden.shape[:-1]``; every other argument as there.
        Naive equivalent (``T``: ``temperature``, ``[..., None]`` for a tensor)::

            z = transform(head(hidden).float()) / T
            F.cross_entropy(z.flatten(0, -2), labels.flatten(), ...)
        """
        return self._run(
            linear_cross_entropy,
            hidden,
            labels,
            chunk_size=chunk_size,
            ignore_index=ignore_index,
            reduction=reduction,
            num_items_in_batch=num_items_in_batch,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            shift=shift,
            class_weight=class_weight,
            return_z_loss=return_z_loss,
            return_token_accuracy=return_token_accuracy,
            temperature=temperature,
        )

    def token_accuracy(
        self,
        hidden: Tensor,
        labels: Tensor,
        *,
        top_k: int = 1,
        ignore_index: int = -100,
        shift: bool = False,
        chunk_size: int | None = None,
    ) -> Tensor:
        """``chunklogits.token_accuracy(hidden, weight, labels, bias=bias, shards=shards,
        softcap=softcap, logit_scale=logit_scale, ...)``: the fraction (fp32 scalar) of
        non-ignored labels among the ``top_k`` largest of the head's own logits. Naive
        equivalent: ``reference.token_accuracy`` on ``head(hidden)`` with the transform applied
        in the model dtype."""
        return self._run(
            token_accuracy,
            hidden,
            labels,
            top_k=top_k,
            ignore_index=ignore_index,
            shift=shift,
            chunk_size=chunk_size,
        )

    def topk_logprobs(
        self,
        hidden: Tensor,
        k: int,
        *,
        temperature: float | Tensor = 1.0,
        chunk_size: int | None = None,
    ) -> TopLogprobs:
        """``chunklogits.topk_logprobs(hidden, weight, k, bias=bias, shards=shards,
        softcap=softcap, logit_scale=logit_scale, ...)``: ``TopLogprobs(values, indices)``, both
        ``[..., k]``: the ``k`` largest of the head's own logits and their fp32 log-probs under
        ``softmax(transform(head(hidden).float()) / temperature)`` (a float, or one per
        position: ``hidden.shape[:-1]``, as in ``token_logprobs``). Not differentiable."""
        return self._run(
            topk_logprobs,
            hidden,
            k,
            temperature=temperature,
            chunk_size=chunk_size,
        )

    def token_logprobs(
        self,
        hidden: Tensor,
        tokens: Tensor,
        *,
        temperature: float | Tensor = 1.0,
        return_entropy: bool = False,
        chunk_size: int | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """``chunklogits.token_logprobs(hidden, weight, tokens, bias=bias, shards=shards,
        softcap=softcap, logit_scale=logit_scale, ...)``: hidden ``[..., D]``, tokens
        ``hidden.shape[:-1]``, as a per-position ``temperature``; returns fp32 log-probs (and
        entropy) shaped like tokens. Naive equivalent::

            z = transform(head(hidden).float()) / temperature  # [..., None] for a tensor
            z.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
        """
        return self._run(
            token_logprobs,
            hidden,
            tokens,
            temperature=temperature,
            return_entropy=return_entropy,
            chunk_size=chunk_size,
        )

    def sample_next(
        self,
        hidden_last: Tensor,
        *,
        do_sample: bool = True,
        temperature: float = 1.0,
        top_k: int = 50,
        top_p: float = 1.0,
        min_p: float | None = None,
        repetition_penalty: float = 1.0,
        prev_tokens: Tensor | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        return_logprobs: bool = False,
    ) -> Tensor | NextTokens:
        """``chunklogits.sample_next(hidden_last, weight, bias=bias, shards=shards,
        softcap=softcap, logit_scale=logit_scale, ...)``: the next token of each row of
        ``hidden_last [B, D]``, drawn as ``generate()`` draws it (``[B]``, or ``NextTokens`` with
        their log-probs). Naive equivalent: ``reference.sample_next``, i.e. ``head(hidden_last)
        .float()`` through transformers' logits processors, softmax and ``torch.multinomial``.
        """
        return self._run(
            sample_next,
            hidden_last,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            prev_tokens=prev_tokens,
            seed=seed,
            generator=generator,
            return_logprobs=return_logprobs,
        )

    def _run(self, op: Callable, hidden: Tensor, *args, **options):
        """``op(hidden, weight, *args, bias=, softcap=, logit_scale=, shards=, process_group=,
        **options)`` with this head's settings and this rank's slice of a vocab-parallel head
        (``local_head``). Under ``torch.autocast`` for hidden's device the operands are cast to
        the autocast dtype as ``F.linear`` casts them there, and the op runs with autocast off
        (its blocks are already in that dtype)."""
        weight, bias, process_group = local_head(self.weight, self.bias)
        device_type = hidden.device.type
        context = nullcontext()
        # Devices autocast does not know (meta: shapes only) are never under it.
        if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)

            def cast(tensor: Tensor | None) -> Tensor | None:
                # Autocast leaves fp64 alone (and non-float tensors, which check_head refuses).
                if tensor is None or tensor.dtype == torch.float64:
                    return tensor
                return tensor.to(dtype)

            hidden, weight, bias = cast(hidden), cast(weight), cast(bias)
            context = torch.autocast(device_type, enabled=False)
        with context:
            return op(
                hidden,
                weight,
                *args,
                bias=bias,
                softcap=self.softcap,
                logit_scale=self.logit_scale,
                shards=self.shards,
                process_group=process_group,
                **options,
            )

    @classmethod
    def wrap(
        cls, model: nn.Module, shards: int | None = None, *, return_logits: bool | None = None
    ) -> nn.Module:
        """Put a ``ChunkedLMHead`` in place of a transformers ``*ForCausalLM``'s output layer,
        in place; returns ``model``.

        The head holds the same Parameters (tied embeddings stay tied; ``state_dict`` keys and
        ``save_pretrained`` files are unchanged) and the transform read from the config
        (Gemma-2/3 ``final_logit_softcapping``, RecurrentGemma ``logits_soft_cap``, xLSTM
        ``output_logit_soft_cap``, Cohere ``logit_scale``, Falcon-H1 ``lm_head_multiplier``,
        Granite ``1 / logits_scaling``, HyperCLOVAX ``logits_scaling``). The instance's forward
        is patched:

        * with ``labels``, the loss is ``head.loss(hidden, labels, shift=True,
          num_items_in_batch=...)`` on the hidden states the output layer receives, with
          transformers' ``ForCausalLMLoss`` semantics (``ignore_index=-100``, ``shift_labels``,
          ``num_items_in_batch``); for a model whose forward takes the cross-entropy of each
          position against its own label (BART-family, TrOCR and Whisper decoders, XLM, XLNet,
          CPM-Ant: the probe tells), ``head.loss(hidden, labels)`` as it does, unshifted, the
          other loss arguments ignored as there. An encoder-decoder model (T5, BART, Marian,
          M2M100/NLLB, Whisper, ...) takes that unshifted loss over its decoder's positions
          (T5Gemma's ``ForMaskedLMLoss`` with ``num_items_in_batch``); without
          ``decoder_input_ids`` the decoder input is built from the labels as its forward
          builds it, and the BART family's ``final_logits_bias`` joins the head's bias.
          ``return_logits`` says whether
          ``outputs.logits`` is computed too (in full, as the original does): ``None``
          (default) when the call is an
          evaluation, the model in eval mode with autograd off (``Trainer.evaluate``/``predict``
          and ``compute_metrics`` get the logits of each batch they ask for), ``True`` always,
          ``False`` never. With autograd on (a loss to backpropagate, in training or eval mode)
          no ``[tokens, vocab]`` tensor is made. With ``return_dict=False`` the tuple keeps the
          original's positions: ``(loss, logits, *rest)``, ``logits`` None when not computed;
        * without ``labels``, the outputs are the original forward's (``logits_to_keep``
          positions, model dtype), so ``generate()`` and evaluation code are unaffected. Called
          so in training with autograd on (as ``Trainer`` does for ``label_smoothing_factor``
          and ``compute_loss_func``, which take the loss from the logits), it warns that the
          full logits were made.

        ``model`` may be a PEFT model (wrapped: its ``get_base_model()``), and the output layer
        a PEFT LoRA ``Linear`` or ``ModulesToSaveWrapper`` around an ``nn.Linear``; a wrapped
        model may equally be given to ``get_peft_model`` with ``lm_head`` in ``target_modules``
        or ``modules_to_save``. The loss then uses the active copy of ``modules_to_save``, or
        the LoRA layer's effective weight ``W + scaling * B @ A``, applied as ``[x, scaling *
        lora_A(dropout(x))] @ [W, B].T`` (PEFT's dropout mask, no ``B @ A`` formed).
        ``resize_token_embeddings`` resizes the original layer and wraps the result again.
        Under ``torch.autocast`` (also accelerate's ``mixed_precision``) the loss's block GEMMs
        run in the autocast dtype the output layer is called under (see the class docstring).

        Before returning, a probe on a tiny input checks that the wrapped forward reproduces the
        original's loss and logits (within the autocast dtype's rounding under autocast); a
        model whose output layer, logit transform or loss is not reproduced is refused with a
        ``ValueError`` naming it. ``shards`` as in the constructor.
        """
        from .integrations import transformers as hf

        return hf.wrap(cls, model, shards=shards, return_logits=return_logits)

    @staticmethod
    def unwrap(model: nn.Module) -> nn.Module:
        """Undo ``wrap``: put the original output layers (holding the heads' current
        Parameters), forward and ``resize_token_embeddings`` back, in place; returns ``model``."""
        from .integrations import transformers as hf

        return hf.unwrap(model)


def _as_parameter(tensor: Tensor) -> Tensor:
    """A Parameter as is; a leaf tensor as a Parameter sharing its data; a tensor with a
    ``grad_fn`` as is, so that the graph it comes from is kept (a new Parameter would be a leaf
    and cut it)."""
    if isinstance(tensor, nn.Parameter) or tensor.grad_fn is not None:
        return tensor
    return nn.Parameter(tensor, requires_grad=tensor.requires_grad)
