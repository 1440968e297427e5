"""Every causal LM transformers ships (``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``), built from a tiny
config, either passes every check against the unwrapped model or is refused by name:

* ``ChunkedLMHead.wrap``: the training loss and the output and input embeddings' gradients equal
  the unwrapped model's (accuracy rule against the fp64 model), ``generate`` greedy unchanged;
* ``cl.sequence_logprobs`` equals the log-softmax of the unwrapped model's logits;
* ``cl.sample`` greedy gives ``generate``'s greedy tokens.

A refusal is a ``ValueError``/``TypeError`` naming the class; which classes are refused, by which
operation and why, is listed in ``REFUSED`` (so a class that regresses from passing to refused, or
the reverse, fails here). Classes whose tiny model cannot be built for reasons outside chunklogits
are listed in ``CANNOT_BUILD`` with the reason, and skipped with it.

By default a representative subset runs (``FAST``: every transform of the table, every loss
convention, the refusals' kinds); ``CHUNKLOGITS_ALL_ARCHITECTURES=1`` runs every entry.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import transformers
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import chunklogits as cl
from tests.helpers import assert_as_accurate, one_thread

pytestmark = pytest.mark.usefixtures(one_thread.__name__)

VOCAB = 99
_LAYERS = 2

# The generic shrinking: config attributes (of the config and of each sub-config) set to tiny
# values wherever the config has them.
_TINY = {
    **dict.fromkeys(("hidden_size", "d_model", "n_embd", "embed_dim", "emb_dim", "dim"), 32),
    **dict.fromkeys(
        (
            "num_hidden_layers",
            "n_layer",
            "n_layers",
            "num_layers",
            "decoder_layers",
            "encoder_layers",
            "num_encoder_layers",
            "num_decoder_layers",
        ),
        _LAYERS,
    ),
    **dict.fromkeys(
        (
            "num_attention_heads",
            "n_head",
            "n_heads",
            "num_heads",
            "decoder_attention_heads",
            "encoder_attention_heads",
        ),
        4,
    ),
    **dict.fromkeys(("num_key_value_heads", "num_kv_heads"), 2),
    **dict.fromkeys(("head_dim", "attention_head_dim", "qk_rope_head_dim", "v_head_dim"), 8),
    "qk_nope_head_dim": 8,
    "rotary_dim": 4,
    "qk_head_dim": 16,
    **dict.fromkeys(("kv_lora_rank", "q_lora_rank"), 16),
    **dict.fromkeys(
        (
            "intermediate_size",
            "decoder_ffn_dim",
            "encoder_ffn_dim",
            "ffn_dim",
            "n_inner",
            "d_ff",
            "dim_ff",
            "ffn_hidden_size",
        ),
        64,
    ),
    **dict.fromkeys(
        (
            "moe_intermediate_size",
            "shared_expert_intermediate_size",
            "shared_intermediate_size",
            "expert_ffn_hidden_size",
            "dense_intermediate_size",
            "first_dense_intermediate_size",
        ),
        16,
    ),
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"), 4),
    **dict.fromkeys(("num_experts_per_tok", "moe_topk", "moe_k", "num_experts_per_token"), 2),
    **dict.fromkeys(("n_group", "topk_group", "num_expert_group"), 1),
    **dict.fromkeys(("vocab_size", "decoder_vocab_size", "unpadded_vocab_size"), VOCAB),
    **dict.fromkeys(("max_position_embeddings", "n_positions", "n_ctx"), 64),
    **dict.fromkeys(("first_k_dense_replace", "num_dense_layers"), 1),
    # The logit transforms, set where they change the logits visibly (random-init logits are
    # O(1)): a transform missing from chunklogits' table fails the comparisons, not only the
    # probe.
    **dict.fromkeys(("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap"), 0.5),
    **dict.fromkeys(("logits_scaling", "logit_scale", "lm_head_multiplier"), 4.0),
}
_TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def _tiny_value(name: str, value, layers_before: int | None):
    """The tiny value of config attribute ``name`` (default ``value``), or ``value``."""
    if name in _TINY and isinstance(value, (int, float)) and not isinstance(value, bool):
        return type(value)(_TINY[name]) if value else value
    if ("dropout" in name or "pdrop" in name or name.endswith("layerdrop")) and isinstance(
        value, float
    ):
        return 0.0
    if name == "router_jitter_noise" and isinstance(value, float):
        return 0.0
    if name.endswith("token_id"):
        if isinstance(value, int) and value >= VOCAB:
            return _TOKENS.get(name, VOCAB - 1)
        if isinstance(value, list):
            return [v for v in value if v < VOCAB] or [_TOKENS.get(name, VOCAB - 1)]
    # Per-layer lists (layer types, MoE layers) follow the layer count, keeping a layer of each
    # of the first two kinds (a hybrid model's attention and linear-attention layers).
    if isinstance(value, list) and layers_before and len(value) == layers_before:
        kinds = list(dict.fromkeys(value)) if all(isinstance(v, str) for v in value) else []
        return kinds[:_LAYERS] if len(kinds) > 1 else value[:_LAYERS]
    return value


def tiny_config(model_type: str):
    """The config class's defaults shrunk by ``_TINY``, sub-configs included."""
    return _shrunk(CONFIG_MAPPING[model_type])


_WIDTHS = ("hidden_size", "d_model", "n_embd", "embed_dim")


def _hidden_sizes(values: dict) -> set:
    """The full-size hidden sizes of a config's ``to_dict()`` and of its sub-configs'."""
    sizes = {values[k] for k in _WIDTHS if isinstance(values.get(k), int)}
    for sub in values.values():
        if isinstance(sub, dict):
            sizes |= {sub[k] for k in _WIDTHS if isinstance(sub.get(k), int)}
    return sizes


def _tied_width(name: str, value, widths: set) -> bool:
    """Whether attribute ``name`` (not in ``_TINY``) is a width tied to a hidden size: a size or
    dimension whose default is one of the full-size hidden sizes ``widths`` of its config, its
    sub-configs or its parents (an adapter's or projection's input/output width, which a
    composite config requires to equal the hidden size it connects to)."""
    return (
        name not in _TINY
        and type(value) is int
        and value in widths
        and ("size" in name or "dim" in name)
        and not any(part in name for part in ("vocab", "position", "window", "chunk", "image"))
    )


def _shrunk(config_class, defaults=None, widths=frozenset()):
    default = config_class(**(defaults or {}))
    values = default.to_dict()
    widths = widths | _hidden_sizes(values)
    layers_before = next(
        (values[k] for k in ("num_hidden_layers", "n_layer", "num_layers") if k in values), None
    )
    arguments = {}
    for name, value in values.items():
        if name in getattr(config_class, "sub_configs", {}) and value is not None:
            sub = getattr(default, name)
            arguments[name] = _shrunk(type(sub), value, widths).to_dict()
            continue
        if _tied_width(name, value, widths):
            arguments[name] = _TINY["hidden_size"]
            continue
        tiny = _tiny_value(name, value, layers_before)
        if tiny is not value:
            arguments[name] = tiny
    if "kv_lora_rank" in values:  # multi-head latent attention: as many kv heads as heads
        arguments["num_key_value_heads"] = _TINY["num_attention_heads"]
    # Sizes left None that the model derives from none: a head size, hidden / heads; kv heads, as
    # many as heads (what None means where a model handles it).
    if values.get("head_dim", 0) is None and "num_attention_heads" in values:
        arguments["head_dim"] = _TINY["hidden_size"] // _TINY["num_attention_heads"]
    if values.get("num_key_value_heads", 0) is None and "num_attention_heads" in values:
        arguments["num_key_value_heads"] = _TINY["num_attention_heads"]
    if "kv_lora_rank" in values and isinstance(values.get("head_dim"), int):
        # Latent attention's rotary part (head_dim x partial_rotary_factor) is qk_rope_head_dim.
        partial = (values.get("rope_parameters") or {}).get("partial_rotary_factor")
        if partial:
            arguments["head_dim"] = int(_TINY["qk_rope_head_dim"] / partial)
    if values.get("per_layer_config"):
        arguments["per_layer_config"] = _per_layer_config(values, arguments)
    rope = values.get("rope_parameters")
    mrope = "mrope_section" in getattr(config_class, "ignore_keys_at_rope_validation", ())
    if isinstance(rope, dict) and rope and (mrope or "mrope_section" in rope):
        # Multimodal RoPE: (time, height, width) sections of the tiny heads' rotary half (the
        # models' default sections are the full-size heads').
        partial = rope.get("partial_rotary_factor", values.get("partial_rotary_factor", 1.0))
        half = int(_TINY["head_dim"] * partial) // 2
        arguments["rope_parameters"] = {
            **rope,
            "mrope_section": [half - 2 * (half // 4), half // 4, half // 4],
        }
    arguments.update(_OVERRIDES.get(config_class.model_type, {}))
    return config_class(**{**(defaults or {}), **arguments})


def _per_layer_config(values: dict, arguments: dict) -> dict:
    """A heterogeneous config's per-layer overrides ({layer index: {attribute: value}}) for the
    tiny layers: each tiny layer takes the (shrunk) overrides of the first full-size layer of its
    kind (its layer type), the indices then in range of the tiny layer count."""
    overrides = {int(index): each for index, each in values["per_layer_config"].items()}
    kinds_before = values.get("layer_types") or list(range(max(overrides) + 1))
    kinds = arguments.get("layer_types", kinds_before)[:_LAYERS]
    tiny = {}
    for index, kind in enumerate(kinds):
        layer = kinds_before.index(kind)
        if layer in overrides:
            tiny[index] = {k: _tiny_value(k, v, None) for k, v in overrides[layer].items()}
            if "kv_lora_rank" in values and "num_key_value_heads" in tiny[index]:
                tiny[index]["num_key_value_heads"] = _TINY["num_attention_heads"]  # as below
    return tiny


# Per-class arguments that the generic shrinking cannot derive (layer patterns, head counts tied
# to other sizes).
_OVERRIDES: dict[str, dict] = {
    "recurrent_gemma": {"block_types": ["recurrent", "attention"]},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_offset": 1},
    "deepseek_v2": {"num_experts_per_tok": 2},
    "xmod": {"default_language": "en_XX"},
    # The defaults have no attention layer, which transformers' masks then fail on.
    "bamba": {"mamba_n_heads": 4, "mamba_d_head": 16, "attn_layer_indices": [1]},
    "granitemoehybrid": {
        "mamba_n_heads": 4,
        "mamba_d_head": 16,
        "layer_types": ["mamba", "attention"],
    },
    "mamba2": {"head_dim": 16, "n_groups": 1},  # its 4 tiny heads in groups of heads
    # Defaults left None (per-layer kinds, RoPE per layer type, the sparse-attention indexer,
    # the vision layers fed to the decoder), which the models index without deriving them.
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    "deepseek_ocr2_text": {"mlp_layer_types": ["dense", "sparse"], "num_experts_per_tok": 2},
    "cohere_compass_text": {
        "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}
    },
    "qwen4_exp_text": {
        "indexer_n_heads": 2,
        "indexer_kv_heads": 1,
        "indexer_head_dim": 8,
        "indexer_budget": 4,
        "indexer_compress_ratio": 2,
    },
    # MusicGen's token rows are (batch x codebooks): the tests' 2 rows, one sample's 2 codebooks;
    # its generate() starts the delay pattern at decoder_start_token_id, which its decoder config
    # (the causal LM's) does not set.
    **{
        model_type: {"num_codebooks": 2, "decoder_start_token_id": _TOKENS["bos_token_id"]}
        for model_type in ("musicgen_decoder", "musicgen_melody_decoder")
    },
    "dots1": {"n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1},
    "diffusion_gemma_text": {"num_experts": 4, "top_k_experts": 2, "moe_intermediate_size": 16},
    "granite4_vision": {"deepstack_layer_map": [[0, 0], [1, 1]], "spatial_target_layers": [1]},
    "molmo2_adapter": {"vision_feature_layer": [-1, -2]},
    # DbrxAttention reads attn_config.rope_theta, which DbrxAttentionConfig does not declare, and
    # clamps by clip_qkv, whose default None (no bound) torch.clamp rejects.
    "dbrx": {"attn_config": {"kv_n_heads": 1, "rope_theta": 10000.0, "clip_qkv": 8.0}},
    # xLSTM's cache rounds its q/k and v widths (hidden x factor) up to a multiple of 64, its
    # layers do not: widths of 64 agree.
    "xlstm": {"qk_dim_factor": 2.0, "v_dim_factor": 2.0},
    # Reformer's LM head runs as a decoder; its axial position embeddings split the hidden size
    # and factor the positions; local attention only (LSH hashes sequences of chunks).
    "reformer": {
        "is_decoder": True,
        "axial_pos_embds_dim": [16, 16],
        "axial_pos_shape": [8, 8],
        "attn_layers": ["local", "local"],
    },
    # Validated limits: NVFP4 key/value rounding of 16-wide heads; ZAYA's single-expert routing.
    # Kolibri's sparse-attention indexer: heads within one kv head's queries, a layer in range.
    "kolibri1_1": {"head_dim": 16, "index_num_heads": 2, "index_layers": [1]},
    # Gemma-3n's kv-cache sharing: its shared layers reuse the last earlier layer of each type,
    # so a sliding and a full layer before two sharing ones.
    "gemma3n_text": {
        "num_hidden_layers": 4,
        "layer_types": ["sliding_attention", "full_attention"] * 2,
        "num_kv_shared_layers": 2,
        "intermediate_size": [_TINY["intermediate_size"]] * 4,
        "activation_sparsity_pattern": [0.95, 0.95, 0.0, 0.0],
    },
    "zaya": {"num_experts_per_tok": 1},
    # Zamba ties its one shared transformer across its hybrid layers: two of them (its attention
    # on the concatenated input and embeddings, twice the hidden size).
    "zamba": {
        "layers_block_type": ["hybrid", "hybrid"],
        "attention_hidden_size": 2 * _TINY["hidden_size"],
        "attention_head_dim": 2 * _TINY["hidden_size"] // _TINY["num_attention_heads"],
    },
    # Multimodal RoPE sections the models default to without declaring them (PaddleOCR-VL), or
    # whose height and width sections must be equal (ERNIE-4.5-VL), of the tiny heads' half.
    "paddleocr_vl_text": {
        "rope_parameters": {"rope_type": "default", "rope_theta": 5e5, "mrope_section": [2, 1, 1]}
    },
    "ernie4_5_vl_moe_text": {
        "rope_parameters": {"rope_type": "default", "rope_theta": 5e5, "mrope_section": [1, 1, 2]}
    },
    # Its sliding-window layers' head size is their latent attention's nope + rope head sizes.
    "dots3_note_text": {"head_dim": _TINY["qk_nope_head_dim"] + _TINY["qk_rope_head_dim"]},
}

# Entries whose tiny model cannot be built here, and why (none of it chunklogits'): a missing
# optional dependency, or a config the generic shrinking does not (yet) make valid.
_NO_TINY_CONFIG = "the generic shrinking derives no valid tiny config: "
CANNOT_BUILD: dict[str, str] = {
    "gemma3n": "its vision tower (TimmWrapperModel) needs the timm library, not installed",
    # Not skipped for the shrinking: what fails is in the libraries (see the reasons).
    "blt": "transformers: BltModel.forward builds DynamicCache(config=BltConfig), which has no "
    "num_hidden_layers (AttributeError), on token ids alone",
    **{
        model_type: _NO_TINY_CONFIG + reason
        for model_type, reason in {
            "gemma4_assistant": "its defaults fail validation (hidden_size_per_layer_input)",
            "gemma4_unified_assistant": "its cache-sharing layer types do not survive 2 layers",
        }.items()
    },
}

# What each refused entry is refused by: {model_type: {"wrap" / "sample": fragment of the reason}}
# ("wrap" covers the loss, generate after wrapping and sequence_logprobs, which wraps).
REFUSED: dict[str, dict[str, str]] = {
    # Output layers that are not a plain nn.Linear.
    "dory": {"wrap": "DoryLMHead, expected a plain", "sample": "got DoryLMHead"},
    "ergo": {
        "wrap": "ErgoLinearWithFP32Output, expected a plain",
        "sample": "got ErgoLinearWithFP32Output",
    },
    # Its logits are computed from the output layer's over n-gram streams.
    "prophetnet": {
        "wrap": "its logits have shape (2, 99), not its output layer's (2, 6, 99)",
        "sample": "refuses ProphetNetForCausalLM, whose head it does not reproduce",
    },
    # Its output layer is one linear per codebook; its own generate() fails on token ids
    # (transformers 5.25 expands the inputs by expand_size None), the unwrapped model's call.
    # Its own generate() keeps its arguments from GenerationMixin.generate's.
    "musicgen_melody": {
        "wrap": "MusicgenMelodyForCausalLM's output layer is a torch.nn.modules.container",
        "sample": "refuses MusicgenMelodyForCausalLM, whose own generate() does not hand",
    },
    "musicgen": {
        "wrap": "MusicgenForCausalLM's output layer is a torch.nn.modules.container.ModuleList",
        "sample": "repeat_interleave() received an invalid combination of arguments",
    },
    # Its own forward (the unwrapped model's too) trains only on sequences as long as its axial
    # position shape's product (64 here), not on the checks' 7 tokens.
    "reformer": {"wrap": "make sure that config.axial_pos_shape factors: (8, 8) multiply to"},
    # Its forward computes no loss from token ids and labels alone (an image-token offset).
    "git": {"wrap": "refusing GitForCausalLM, whose forward fails on token ids and labels"},
    # cl.sample: the output layer is fed more than the base model's last hidden state (BERT-style
    # prediction heads: dense + LayerNorm; Electra's and RemBERT's projections; MiniCPM3's and
    # Inkling's scaling). wrap and sequence_logprobs take the layer's input from the forward.
    **{
        model_type: {
            "sample": f"refuses {MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]}, whose head it "
            "does not reproduce"
        }
        for model_type in (
            "bert",
            "big_bird",
            "camembert",
            "data2vec-text",
            "electra",
            "ernie",
            "inkling_text",
            "megatron-bert",
            "minicpm3",
            "modernbert-decoder",
            "rembert",
            "roberta",
            "roberta-prelayernorm",
            "roc_bert",
            "roformer",
            "xlm-roberta",
            "xlm-roberta-xl",
            "xmod",
        )
    },
}

ALL = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
# The default subset: plain, tied, biased and MoE heads, every transform of the table (Gemma-2's
# and RecurrentGemma's caps, Cohere's, Granite's and HyperCLOVAX's scales, MiniCPM3's pre-head
# scaling), the unshifted loss (BART, TrOCR, XLM, XLNet, CPM-Ant), hybrid and recurrent models,
# and each kind of refusal. Falcon-H1 (lm_head_multiplier, 15 s) runs in the full sweep only.
FAST = [
    "bart",
    "bert",
    "cohere",
    "cpmant",
    "dory",
    "gemma2",
    "git",
    "gpt2",
    "granite",
    "hyperclovax",
    "jamba",
    "llama",
    "minicpm3",
    "mixtral",
    "phi",
    "qwen3_5_text",
    "recurrent_gemma",
    "rwkv",
    "trocr",
    "xlm",
    "xlnet",
]


def sweep_entries(every: list[str], fast: list[str]) -> list[str]:
    """The model types a sweep runs: ``every`` one with ``CHUNKLOGITS_ALL_ARCHITECTURES=1``,
    else its default subset ``fast``."""
    return every if os.environ.get("CHUNKLOGITS_ALL_ARCHITECTURES") == "1" else fast


ENTRIES = sweep_entries(ALL, FAST)


def build(model_type: str, mapping=MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, config=None):
    """The tiny fp32 model of ``model_type``'s class in ``mapping`` (a transformers auto
    mapping's names; by default the causal LMs'), in training mode (dropout 0); ``config``: the
    config to build it from, by default ``tiny_config(model_type)``."""
    class_name = mapping[model_type]
    torch.manual_seed(0)
    model_class = getattr(transformers, class_name)
    config = tiny_config(model_type) if config is None else config
    if not isinstance(config, model_class.config_class):
        # A composite config's text model, or a class shared by another model type
        # (ShieldGemma-2's Gemma3ForConditionalGeneration).
        try:
            text_config = config.get_text_config()
        except ValueError:  # several text configs (MusicGen's text encoder and decoder)
            text_config = None
        config = (
            text_config
            if isinstance(text_config, model_class.config_class)
            else tiny_config(model_class.config_class.model_type)
        )
    model = model_class(config)
    return model.float().train()


def _ids(seed: int, shape=(2, 7)) -> torch.Tensor:
    return torch.randint(3, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def _refusal(run) -> str | None:
    """Run ``run()``; None if it returns, the message of a ``ValueError``/``TypeError`` (a
    refusal, which ``REFUSED`` says is expected and what it names), anything else raised as is."""
    try:
        run()
    except (ValueError, TypeError) as error:
        return str(error)
    return None


def _in_fp64(model):
    """A fp64 copy of ``model``, its experts (if any) run by transformers' per-expert loop: the
    grouped GEMM (``torch._grouped_mm``) takes no fp64."""
    exact = copy.deepcopy(model)
    for module in exact.modules():
        config = getattr(module, "config", None)
        if getattr(config, "_experts_implementation", None) not in (None, "eager"):
            config._experts_implementation = "eager"
    return exact.double()


def losses_and_embedding_grads(runs: dict, loss_of) -> dict:
    """``{name: {"loss", "output embedding grad", "input embedding grad"}}`` of each model of
    ``runs`` (``{name: model}``, the fp64 one named "exact", last), its loss ``loss_of(model)``
    backpropagated; "exact" left out where the model does not run in fp64 (a RuntimeError)."""
    results = {}
    for name, each in runs.items():
        torch.manual_seed(0)
        try:
            loss = loss_of(each)
        except RuntimeError:
            if name != "exact":
                raise
            break  # no fp64 run of this model
        loss.backward()
        results[name] = {
            "loss": loss.detach(),
            "output embedding grad": each.get_output_embeddings().weight.grad,
            "input embedding grad": each.get_input_embeddings().weight.grad,
        }
    return results


def _check_wrap(model):
    """Training loss and gradients, generate and sequence_logprobs against the unwrapped model
    (HF's own code). The loss and gradients by the accuracy rule against the fp64 model where
    the model runs in fp64 (the fp32 backward of some, RWKV's, is itself 1e-4 off; experts by
    the per-expert loop there); else (fp32-only kernels) within fp32 rounding of the unwrapped
    model's: the head's blocks differ from its one GEMM in the order of summation."""
    input_ids = _ids(1)
    ours = cl.ChunkedLMHead.wrap(copy.deepcopy(model))
    runs = {"ours": ours, "naive": model, "exact": _in_fp64(model)}
    results = losses_and_embedding_grads(
        runs, lambda each: each(input_ids=input_ids, labels=input_ids).loss
    )
    for key in results["naive"]:
        if "exact" in results:
            assert_as_accurate(*(r[key] for r in results.values()), torch.float32, key)
        else:
            torch.testing.assert_close(results["ours"][key], results["naive"][key], msg=key)

    model.eval(), ours.eval()
    with torch.no_grad():
        expected = model.generate(input_ids, max_new_tokens=3, do_sample=False)
        assert torch.equal(ours.generate(input_ids, max_new_tokens=3, do_sample=False), expected)
        # First: an encoder-decoder model is refused by name here, and its own forward would
        # fail on the oracle's call without a decoder input.
        logprobs = cl.sequence_logprobs(model, input_ids)
        logits = model(input_ids=input_ids).logits[:, :-1].float()
    truth = logits.log_softmax(-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(logprobs, truth)


def _check_sample(model):
    model.eval()
    input_ids = _ids(2)
    with torch.no_grad():
        expected = model.generate(input_ids, max_new_tokens=3, do_sample=False)
        got = cl.sample(model, input_ids, max_new_tokens=3, do_sample=False)
    assert torch.equal(got, expected)


def outcome(
    model_type: str, mapping=MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, *, make=None, checks=None
) -> dict[str, str]:
    """{"wrap" / "sample": refusal message} of ``model_type``'s tiny model (its class in
    ``mapping``, or ``make()``: a fresh model per check) under ``checks`` (by default the causal
    LMs' ``{"wrap": _check_wrap, "sample": _check_sample}``); empty if it passes."""
    make = make or (lambda: build(model_type, mapping))
    checks = checks or {"wrap": _check_wrap, "sample": _check_sample}
    refusals = {}
    for what, check in checks.items():
        model = make()
        message = _refusal(lambda: check(model))  # noqa: B023
        if message is not None:
            refusals[what] = message
    return refusals


# cl.sample's refusal of a logits processor that the model's generation config turns on (BART's
# forced_eos_token_id, Whisper's begin_suppress_tokens, ...), named by its setting: accepted for
# any entry, since which processors cl.sample reproduces grows independently of the model.
_PROCESSOR_REFUSAL = "chunklogits.sample reproduces the logits processors of"


def assert_passes_or_is_refused_by_name(
    model_type: str,
    mapping=MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    refused=REFUSED,
    cannot_build=CANNOT_BUILD,
    outcome_of=None,
) -> None:
    """``outcome`` of ``model_type``'s class in ``mapping`` (or ``outcome_of(model_type)``) is
    the refusals ``refused`` lists for it (none: it passes); skipped with the reason
    ``cannot_build`` gives for it."""
    if model_type in cannot_build:
        pytest.skip(f"cannot build {model_type}: {cannot_build[model_type]}")
    refusals = outcome_of(model_type) if outcome_of else outcome(model_type, mapping)
    if _PROCESSOR_REFUSAL in refusals.get("sample", ""):
        del refusals["sample"]
    expected = refused.get(model_type, {})
    assert sorted(refusals) == sorted(expected), refusals
    for what, fragment in expected.items():
        assert fragment in refusals[what], refusals[what]


@pytest.mark.parametrize("model_type", ENTRIES)
def test_passes_or_is_refused_by_name(model_type):
    assert_passes_or_is_refused_by_name(model_type)
