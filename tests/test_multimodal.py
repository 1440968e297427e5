"""Vision-language models (transformers' ``MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES``, which
TRL's SFT trains) through chunklogits, on image inputs laid out as each family's processor lays
them out: image tokens at the config's image token id in ``input_ids``, the pixels (and Qwen-VL's
patch grid, Mllama's tiles and aspect ratios) beside them, labels -100 on the image tokens as SFT
sets them, and a right-padded row:

* ``ChunkedLMHead.wrap``: the training loss and every parameter's gradient, vision tower
  included, against the unwrapped model (accuracy rule against the fp64 model), fp32 and bf16;
* ``generate`` of the wrapped model gives the unwrapped model's greedy tokens, and ``cl.sample``
  greedy gives them too;
* ``cl.sequence_logprobs`` against the log-softmax of the unwrapped model's logits.

The sweep then builds every class of the mapping from a tiny config (``test_architectures``'
machinery) and checks that it passes ``test_architectures``' checks or is refused by name. Those
checks are text-only (token ids without images): image inputs cannot be built generically (each
family lays out its pixels, patch grids, tiles and image tokens its own way), so the sweep checks
the head, its transform and its loss on text, and the tests above check the image path of the
families in ``BUILDERS``. By default a subset runs (``FAST``); ``CHUNKLOGITS_ALL_ARCHITECTURES=1``
runs the whole mapping.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

import chunklogits as cl
from chunklogits import reference
from chunklogits.integrations import transformers as integration
from tests.helpers import one_thread, seeded
from tests.test_architectures import (
    assert_passes_or_is_refused_by_name,
    sweep_entries,
    tiny_config,
)
from tests.test_transformers import _compare_with_unwrapped

pytestmark = pytest.mark.usefixtures(one_thread.__name__)

MAPPING = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
# Image-side token ids of the tiny models, inside their vocabulary of 99.
IMAGE, START, END = 97, 95, 94


def _model(model_type: str, config):
    torch.manual_seed(0)
    return getattr(transformers, MAPPING[model_type])(config).float().train()


def _pixels(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=seeded(2))


def _ids(length: int) -> torch.Tensor:
    return torch.randint(3, 90, (2, length), generator=seeded(1))


def _square_vision(config, size: int = 32, patch: int = 8) -> None:
    """A ``size`` x ``size`` image of ``patch`` x ``patch`` patches."""
    config.vision_config.image_size, config.vision_config.patch_size = size, patch


def _gemma3():
    config = tiny_config("gemma3")
    config.image_token_index, config.boi_token_index, config.eoi_token_index = IMAGE, START, END
    config.mm_tokens_per_image = 4  # 16 patches pooled to 2 x 2
    _square_vision(config)
    ids = _ids(12)
    ids[:, 1], ids[:, 2:6], ids[:, 6] = START, IMAGE, END
    # Gemma-3's processor marks the image tokens (bidirectional attention among them).
    token_types = (ids == IMAGE).long()
    return config, ids, {"pixel_values": _pixels(2, 3, 32, 32), "token_type_ids": token_types}


def _llava(model_type: str):
    def build():
        config = tiny_config(model_type)
        config.image_token_index, config.image_seq_length = IMAGE, 16
        _square_vision(config)
        ids = _ids(20)
        ids[:, 1:17] = IMAGE  # one token per patch (the CLS feature dropped)
        return config, ids, {"pixel_values": _pixels(2, 3, 32, 32)}

    return build


def _paligemma():
    config = tiny_config("paligemma")
    config.image_token_index = IMAGE
    _square_vision(config)
    config.vision_config.num_image_tokens = config.text_config.num_image_tokens = 16
    config.projection_dim = config.vision_config.projection_dim = config.text_config.hidden_size
    ids = _ids(20)
    ids[:, :16] = IMAGE  # the image first, then the prefix, then the suffix
    token_types = torch.zeros_like(ids)
    token_types[:, 18:] = 1  # the suffix, the part trained on
    return config, ids, {"pixel_values": _pixels(2, 3, 32, 32), "token_type_ids": token_types}


def _qwen_vl(model_type: str):
    def build():
        config = tiny_config(model_type)
        config.image_token_id, config.vision_start_token_id, config.vision_end_token_id = (
            IMAGE,
            START,
            END,
        )
        config.video_token_id = 96
        vision = config.vision_config
        vision.depth, vision.num_heads, vision.intermediate_size = 2, 4, 64
        vision.embed_dim = vision.hidden_size = 32
        vision.out_hidden_size = config.text_config.hidden_size
        if hasattr(vision, "fullatt_block_indexes"):
            vision.fullatt_block_indexes = [1]
        # One image of 4 x 4 patches, merged 2 x 2 into 4 tokens.
        ids = _ids(12)
        ids[:, 2], ids[:, 3:7], ids[:, 7] = START, IMAGE, END
        patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        return (
            config,
            ids,
            {
                "pixel_values": _pixels(2 * 16, patch),
                "image_grid_thw": torch.tensor([[1, 4, 4]] * 2),
                "mm_token_type_ids": (ids == IMAGE).long(),
            },
        )

    return build


def _idefics3():
    config = tiny_config("idefics3")
    config.image_token_id, config.scale_factor = IMAGE, 2
    _square_vision(config)
    ids = _ids(10)
    ids[:, 2:6] = IMAGE  # 16 patches, pixel-shuffled by 2 into 4 tokens
    return config, ids, {"pixel_values": _pixels(2, 1, 3, 32, 32)}


def _mllama():
    config = tiny_config("mllama")
    config.image_token_index = IMAGE
    vision = config.vision_config
    vision.image_size, vision.patch_size, vision.max_num_tiles = 16, 8, 2
    vision.num_global_layers, vision.intermediate_layers_indices = 1, [0]
    vision.vision_output_dim = 2 * vision.hidden_size  # the last and one intermediate layer
    vision.supported_aspect_ratios = [[1, 1], [1, 2]]
    config.text_config.cross_attention_layers = [1]
    ids = _ids(10)
    ids[:, 1] = IMAGE
    # Every token after the image attends to both of its tiles.
    cross_attention_mask = torch.zeros(2, 10, 1, 2, dtype=torch.long)
    cross_attention_mask[:, 1:] = 1
    return (
        config,
        ids,
        {
            "pixel_values": _pixels(2, 1, 2, 3, 16, 16),
            "aspect_ratio_ids": torch.tensor([[2], [2]]),  # [1, 2]: two tiles side by side
            "aspect_ratio_mask": torch.ones(2, 1, 2, dtype=torch.long),
            "cross_attention_mask": cross_attention_mask,
        },
    )


# {model type: () -> (config, input_ids [2, T], image inputs)}.
BUILDERS = {
    "gemma3": _gemma3,
    "llava": _llava("llava"),
    "paligemma": _paligemma,
    "qwen2_vl": _qwen_vl("qwen2_vl"),
    "qwen2_5_vl": _qwen_vl("qwen2_5_vl"),
    "idefics3": _idefics3,
    "mllama": _mllama,
}


def _batch(model_type: str):
    """``(config, input_ids, attention_mask, labels, image inputs)``: labels -100 on the image
    tokens and on the padding (the last two positions of the second row)."""
    config, input_ids, images = BUILDERS[model_type]()
    mask = torch.ones_like(input_ids)
    mask[1, -2:] = 0
    image_side = torch.isin(input_ids, torch.tensor([IMAGE, START, END]))
    labels = input_ids.masked_fill(image_side | (mask == 0), -100)
    return config, input_ids, mask, labels, images


def _in_dtype(images: dict, model) -> dict:
    """The floating-point image inputs in the model's dtype, as a processor's output is cast."""
    return {k: v.to(model.dtype) if v.is_floating_point() else v for k, v in images.items()}


@pytest.mark.parametrize("model_type", sorted(BUILDERS))
def test_loss_and_every_gradient_match_the_unwrapped_model(model_type):
    _check_training(model_type, torch.float32)


@pytest.mark.parametrize("model_type", sorted(BUILDERS))
def test_bf16_loss_and_every_gradient_with_either_cpu_gemm(model_type, cpu_gemm):
    _check_training(model_type, torch.bfloat16)


def _check_training(model_type: str, dtype: torch.dtype) -> None:
    """Training loss with images and every parameter's gradient, wrapped against unwrapped."""
    config, input_ids, mask, labels, images = _batch(model_type)

    def run(name, model):
        images_in = _in_dtype(images, model)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels, **images_in).loss
        return {"loss": loss}, loss

    exact = _model(model_type, config).double()
    _compare_with_unwrapped(model_type, dtype, run, exact=exact, shards=3)


@pytest.mark.parametrize("model_type", sorted(BUILDERS))
def test_sequence_logprobs_with_images(model_type):
    config, input_ids, mask, _, images = _batch(model_type)
    weights = torch.randn(2, input_ids.shape[1] - 1, generator=seeded(8))

    def run(name, model):
        compute = cl.sequence_logprobs if name == "ours" else reference.sequence_logprobs
        logprobs, entropy = compute(
            model, input_ids, mask, temperature=0.7, return_entropy=True, **images
        )
        objective = (logprobs * weights).sum() + (entropy * weights.flip(1)).sum()
        return {"logprobs": logprobs, "entropy": entropy}, objective

    exact = _model(model_type, config).double()
    _compare_with_unwrapped(model_type, torch.float32, run, exact=exact, shards=2)


@pytest.mark.parametrize("model_type", sorted(BUILDERS))
def test_generate_unchanged_and_sample_greedy_equals_generate(model_type):
    config, input_ids, _, _, images = _batch(model_type)
    model = _model(model_type, config).eval()
    wrapped = cl.ChunkedLMHead.wrap(copy.deepcopy(model))
    options = {"max_new_tokens": 4, "do_sample": False}
    with torch.no_grad():
        expected = model.generate(input_ids, **images, **options)
        assert expected.shape == (2, input_ids.shape[1] + 4)
        assert torch.equal(wrapped.generate(input_ids, **images, **options), expected)
        for each in (model, wrapped):
            assert torch.equal(cl.sample(each, input_ids, **images, **options), expected)
        # The image inputs reach the prefill: other pixels, other tokens, in both.
        others = {**images, "pixel_values": 3 * images["pixel_values"].flip(0)}
        changed = model.generate(input_ids, **others, **options)
        assert torch.equal(cl.sample(model, input_ids, **others, **options), changed)
        # sequence_logprobs of the unwrapped model (wrapped for the call) with the images.
        truth = reference.sequence_logprobs(model, input_ids, **images)
        torch.testing.assert_close(cl.sequence_logprobs(model, input_ids, **images), truth)


def test_a_text_config_transform_the_forward_ignores(monkeypatch):
    """transformers 5.x's Gemma3ForConditionalGeneration does not apply its text config's
    final_logit_softcapping (Gemma3ForCausalLM does): the wrapped model and cl.sample follow the
    forward, which the probe shows applies none."""
    config, input_ids, mask, labels, images = _batch("gemma3")
    config.text_config.final_logit_softcapping = 0.5
    model = _model("gemma3", config)
    wrapped = cl.ChunkedLMHead.wrap(copy.deepcopy(model))
    assert wrapped.lm_head.softcap is None
    inputs = {"input_ids": input_ids, "attention_mask": mask, "labels": labels, **images}
    torch.testing.assert_close(wrapped(**inputs).loss, model(**inputs).loss)
    model.eval()
    with torch.no_grad():
        expected = model.generate(input_ids, **images, max_new_tokens=3, do_sample=False)
        got = cl.sample(model, input_ids, **images, max_new_tokens=3, do_sample=False)
        # The probe's answer is kept: a second call runs no probe forward.
        probes = []
        monkeypatch.setattr(integration, "_probe_head", lambda *a, **k: probes.append(a))
        again = cl.sample(model, input_ids, **images, max_new_tokens=3, do_sample=False)
        monkeypatch.undo()
    assert torch.equal(got, expected) and torch.equal(again, expected) and not probes
    text_model = transformers.Gemma3ForCausalLM(config.text_config)
    assert cl.ChunkedLMHead.wrap(text_model).lm_head.softcap == 0.5


def test_sample_refuses_a_generate_that_takes_pixels_first():
    """BLIP-2's own generate() takes pixel_values first: cl.sample, which hands generate() the
    token ids first, refuses it by name instead of passing the tokens as pixels."""
    model = transformers.Blip2ForConditionalGeneration(tiny_config("blip-2")).eval()
    with pytest.raises(ValueError, match="refuses Blip2ForConditionalGeneration, whose own gen"):
        cl.sample(model, _ids(5), max_new_tokens=2)


# The sweep (text-only, see the module docstring). Entries whose tiny model cannot be built or
# checked on token ids for reasons outside chunklogits, and why.
_NO_TINY_CONFIG = "the generic shrinking derives no valid tiny config: "
CANNOT_BUILD: dict[str, str] = {
    **dict.fromkeys(
        ("fast_vlm", "gemma3n", "perception_lm"),
        "its vision tower (TimmWrapperModel) needs the timm library, not installed",
    ),
    "inkling_mm_model": "needs the scipy library, not installed",
    **dict.fromkeys(("pi0", "pi05"), "an action model without generate()"),
    "pix2struct": "its own generate() fails on token ids alone (it reads flattened patches)",
    **dict.fromkeys(
        ("qwen2_5_omni_thinker", "qwen3_omni_moe_thinker"),
        "its own generate() fails: its config has no vision_start_token_id for the RoPE index",
    ),
    "pp_formulanet": "transformers: PPFormulaNetModel implements no get_input_embeddings "
    "(NotImplementedError)",
    **{
        model_type: _NO_TINY_CONFIG + reason
        for model_type, reason in {
            "apertus1p5": "its audio token ids (up to 262376) must lie inside the vocabulary",
            "chameleon": "its default config has no vocabulary_map",
            "emu3": "its default config has no vocabulary_map",
            "granite4_vision": "its config sets its Q-Former's heads to the vision hidden size "
            "// 64, none for the tiny vision tower",
        }.items()
    },
}

# Sample refusals that are the unwrapped model's own generate() failing on token ids alone (the
# sweep compares with it first): BLIP's family takes pixel_values first (cl.sample refuses it
# by name, test_sample_refuses_a_generate_that_takes_pixels_first).
_OWN_GENERATE_PIXELS_FIRST = "not enough values to unpack"
_FORWARD_NEEDS_IMAGES = "whose forward fails on token ids and labels alone"
_NO_BASE_MODEL = "expected a transformers causal LM with a base model"
REFUSED: dict[str, dict[str, str]] = {
    "blip": {
        "wrap": "BlipForConditionalGeneration has no output embedding",
        "sample": _OWN_GENERATE_PIXELS_FIRST,
    },
    **{
        model_type: {
            "wrap": f"refusing {MAPPING[model_type]}, {_FORWARD_NEEDS_IMAGES}",
            "sample": _OWN_GENERATE_PIXELS_FIRST,
        }
        for model_type in ("blip-2", "instructblip", "instructblipvideo", "kosmos-2")
    },
    "idefics": {
        "wrap": "IdeficsDecoupledLinear, expected a plain",
        "sample": "Exactly 1 of pixel_values",  # its own generate() needs images
    },
    "git": {"wrap": f"refusing GitForCausalLM, {_FORWARD_NEEDS_IMAGES}"},
    # cl.sample: the decoder is not the model's base model (Llama-4 keeps a whole
    # Llama4ForCausalLM inside, Kosmos-2.5 its text model), or there is none.
    "kosmos-2.5": {"sample": _NO_BASE_MODEL},
    "llama4": {"sample": _NO_BASE_MODEL},
    "nemotron_h_omni": {
        "wrap": "NemotronH_Omni_Reasoning_V3 has no output embedding",
        "sample": _NO_BASE_MODEL,
    },
    **{
        model_type: {
            "wrap": "is an unknown logit transform applied?",
            "sample": f"refuses {MAPPING[model_type]}, whose head it does not reproduce",
        }
        for model_type in ("muse_glimmer", "muse_spark")
    },
    # A block-diffusion model, not a causal LM: its forward fills the tokens up to a block.
    "diffusion_gemma": {
        "wrap": "refusing DiffusionGemmaForBlockDiffusion (in_features=32",
        "sample": "expected a transformers causal LM (a GenerationMixin such as LlamaForCausalLM)"
        ", got DiffusionGemmaForBlockDiffusion",
    },
    # Its own forward (the unwrapped model's too) requires mm_token_type_ids when training.
    "molmo2": {"wrap": "`mm_token_type_ids` is required as a model input when training"},
    "step3p7": {  # its tiny config sets no sliding_window, which its forward needs
        "wrap": f"refusing Step3p7ForConditionalGeneration, {_FORWARD_NEEDS_IMAGES}",
        "sample": "Could not find a `sliding_window`",
    },
    # Encoder-decoder models.
    "florence2": {
        "wrap": "refusing Florence2ForConditionalGeneration (in_features",
        "sample": "refuses Florence2ForConditionalGeneration, whose head it does not reproduce",
    },
    # Its loss, gradients, generate and cl.sample pass; cl.sequence_logprobs (in the wrap
    # check) scores a causal LM's own tokens and refuses an encoder-decoder model by name.
    "t5gemma2": {"wrap": "T5Gemma2ForConditionalGeneration is an encoder-decoder model"},
    **{
        model_type: {
            "wrap": f"refusing {MAPPING[model_type]}, {_FORWARD_NEEDS_IMAGES}",
            "sample": "`decoder_start_token_id` or `bos_token_id` has to be defined",
        }
        for model_type in ("udop", "vision-encoder-decoder")
    },
}

ALL = sorted(MAPPING)
# The default subset: the families of BUILDERS, a text transform the forward ignores
# (Cohere2-Vision's logit_scale), a class shared by another model type (ShieldGemma-2), the
# generic multimodal RoPE (GLM-4V), and each kind of refusal. GLM-5-Next (80 s) runs in the
# full sweep only.
FAST = [
    *BUILDERS,
    "blip-2",
    "cohere2_vision",
    "glm4v",
    "idefics",
    "llama4",
    "muse_glimmer",
    "shieldgemma2",
]
ENTRIES = sweep_entries(ALL, FAST)


@pytest.mark.parametrize("model_type", ENTRIES)
def test_every_class_passes_on_text_or_is_refused_by_name(model_type):
    assert_passes_or_is_refused_by_name(model_type, MAPPING, REFUSED, CANNOT_BUILD)


def _llava_processor(words: list[str]):
    """A LLaVA processor built in memory: a word-level tokenizer over ``words`` with an
    ``<image>`` token, CLIP's image processing to 32 x 32, 8 x 8 patches (16 image tokens), a
    chat template that writes ``<image>`` where a message holds an image."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<pad>", "<eos>", "<unk>", "<image>", "user", "assistant", ":"]
    vocab = {word: i for i, word in enumerate(specials + words)}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=word_level,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )
    template = (
        "{% for m in messages %}{{ m['role'] }} : {% if m['content'] is string %}"
        "{{ m['content'] }}{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}"
        "<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endif %} <eos> {% endfor %}"
    )
    images = transformers.CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    return transformers.LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS feature, dropped by "default"
        chat_template=template,
    )


@pytest.mark.parametrize("wrapped", [False, True])
def test_trl_sft_of_a_vision_language_model(wrapped, tmp_path, monkeypatch):
    """TRL's SFTTrainer on a tiny LLaVA and four in-memory image-and-text conversations, through
    its vision-language collator (``pixel_values`` and ``<image>`` tokens in every batch):
    after ``use_chunklogits(trainer)``, of the model or of the model wrapped by
    ``ChunkedLMHead.wrap`` (whose head it takes), the logged losses and metrics and the
    parameters are TRL's own run's (fp32, within rounding)."""
    import datasets
    import numpy as np
    from PIL import Image
    from trl import SFTConfig, SFTTrainer

    from tests.test_trl import TEXTS, WORDS, _assert_same_logs_and_parameters, _train

    processor = _llava_processor(WORDS)
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    config = tiny_config("llava")
    config.image_token_index = image_token
    _square_vision(config)
    config.text_config.vocab_size = len(processor.tokenizer) + 3
    config.pad_token_id = 0
    model = _model("llava", config)
    pixels = np.random.default_rng(0).integers(0, 255, (len(TEXTS), 32, 32, 3), dtype=np.uint8)
    dataset = datasets.Dataset.from_dict(
        {
            "images": [[Image.fromarray(image)] for image in pixels],
            "messages": [
                [{"role": "user", "content": "what"}, {"role": "assistant", "content": text}]
                for text in TEXTS
            ],
        }
    )
    batches = []

    def run(ours: bool, model=model):
        return _train(
            SFTTrainer, SFTConfig, model, processor, tmp_path, ours, monkeypatch,
            record=batches, train_dataset=dataset, max_steps=2, bf16=False, max_length=None,
        )  # fmt: skip

    theirs_model, theirs, engine_theirs, kernel_theirs = run(False)
    ours_model, ours, engine_ours, kernel_ours = run(
        True, cl.ChunkedLMHead.wrap(copy.deepcopy(model)) if wrapped else model
    )
    assert kernel_theirs > 0 and engine_theirs == 0, "TRL's run: its own kernel computes the head"
    assert kernel_ours == 0 and engine_ours > 0, "after use_chunklogits: chunklogits' engine does"
    for batch in batches:
        assert batch["pixel_values"].shape[1:] == (3, 32, 32)
        assert ((batch["input_ids"] == image_token).sum(1) == 16).all()
    logs = _assert_same_logs_and_parameters(ours_model, ours, theirs_model, theirs, rel=2e-5)
    assert {"loss", "entropy", "mean_token_accuracy"} <= logs[0].keys()


def test_sample_of_a_peft_vision_language_model():
    """A PEFT model's generate(*args, **kwargs) passes the token ids on to GenerationMixin's:
    cl.sample takes it, with the images, and gives its greedy tokens."""
    import peft

    config, input_ids, _, _, images = _batch("llava")
    lora = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(_model("llava", config), lora).eval()
    options = {"max_new_tokens": 3, "do_sample": False}
    with torch.no_grad():
        expected = model.generate(input_ids=input_ids, **images, **options)
        assert torch.equal(cl.sample(model, input_ids, **images, **options), expected)
