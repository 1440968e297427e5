"""PEFT on a wrapped model's output layer: LoRA with ``lm_head`` in ``target_modules`` and
``modules_to_save=["lm_head", "embed_tokens"]``, wrapping before or after ``get_peft_model``,
against the same PEFT model unwrapped: loss and gradients (accuracy rule, the same trainable
parameters), LoRA dropout, saved adapters, ``merge_and_unload``, ``generate``."""

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import chunklogits as cl
from tests.helpers import (
    assert_as_accurate,
    assert_as_accurate_in_norm,
    one_thread,
    seeded,
    tiny_llama_config,
)

pytestmark = pytest.mark.usefixtures(one_thread.__name__)

VOCAB = 307
KINDS = {
    # init_lora_weights=False: B is random, so the adapter changes the logits from the start.
    "lora": {"target_modules": ["q_proj", "v_proj", "lm_head"], "init_lora_weights": False},
    "modules_to_save": {
        "target_modules": ["q_proj"],
        "modules_to_save": ["lm_head", "embed_tokens"],
    },
}
ORDERS = ["wrap-then-peft", "peft-then-wrap"]


def _base(dtype=torch.float32):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_llama_config(VOCAB)).to(dtype)


def _peft_model(kind: str, order: str | None, dtype=torch.float32, dropout: float = 0.0):
    """The PEFT model of ``kind``; wrapped in ``order`` (None: unwrapped). The copies that
    ``modules_to_save`` trains are moved away from the originals, so that using the wrong one
    shows."""
    base = _base(dtype)
    if order == "wrap-then-peft":
        cl.ChunkedLMHead.wrap(base, shards=3)
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, **KINDS[kind])
    model = get_peft_model(base, config)
    g = seeded(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g).to(p.dtype))
    if order == "peft-then-wrap":
        cl.ChunkedLMHead.wrap(model, shards=3)
    return model


def _batch(shape=(3, 11)):
    g = seeded(5)
    input_ids = torch.randint(3, VOCAB, shape, generator=g)
    labels = input_ids.clone()
    labels[0, :4] = -100
    labels[-1, -3:] = -100
    return input_ids, labels


def _loss_and_grads(model, seed: int = 7):
    input_ids, labels = _batch()
    torch.manual_seed(seed)  # the dropout masks
    loss = model(input_ids=input_ids, labels=labels).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return loss, grads


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("kind", KINDS)
def test_loss_and_gradients_match_the_unwrapped_peft_model(kind, order, dtype):
    ours = _peft_model(kind, order, dtype)
    naive = _peft_model(kind, None, dtype)
    exact = copy.deepcopy(naive).double()
    head = ours.get_base_model().lm_head
    inner = head.base_layer if kind == "lora" else head.original_module
    assert isinstance(inner, cl.ChunkedLMHead) and type(head) is type(
        naive.base_model.model.lm_head
    )
    assert _trainable(ours) == _trainable(naive)
    assert {n for n, p in ours.state_dict().items()} == set(naive.state_dict())
    results = [_loss_and_grads(m) for m in (ours, naive, exact)]
    assert set(results[0][1]) == set(results[1][1]) == _trainable(naive)  # exactly these
    assert_as_accurate(*(r[0] for r in results), dtype, f"{kind} loss")
    names = sorted(results[0][1])
    if dtype == torch.float32:
        for name in names:
            assert_as_accurate(*(r[1][name] for r in results), dtype, name)
    else:  # the half-precision backward upstream of the head rounds differently per element
        vectors = (torch.cat([r[1][n].flatten().double() for n in names]) for r in results)
        assert_as_accurate_in_norm(*vectors, dtype, f"{kind} gradients")


@pytest.mark.parametrize("order", ORDERS)
def test_lora_dropout_on_the_head_is_peft_s(order):
    """With an active LoRA dropout the head's input is [x, dropout(x)] against [W, s B A]: the
    same mask PEFT draws (same RNG call), so loss and gradients equal the unwrapped model's."""
    ours = _peft_model("lora", order, dropout=0.3)
    naive = _peft_model("lora", None, dropout=0.3)
    (loss, grads), (naive_loss, naive_grads) = _loss_and_grads(ours), _loss_and_grads(naive)
    torch.testing.assert_close(loss, naive_loss, rtol=1e-5, atol=0)
    assert set(grads) == set(naive_grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, naive_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    ours.eval()  # no dropout: a different loss, so the comparison above saw the masks
    with torch.no_grad():
        assert abs(ours(*_batch()[:1], labels=_batch()[1]).loss - naive_loss) > 1e-3


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("kind", KINDS)
def test_saved_adapter_merge_and_generate(kind, order, tmp_path):
    ours = _peft_model(kind, order).eval()
    naive = _peft_model(kind, None).eval()
    input_ids, labels = _batch()
    ours.save_pretrained(tmp_path / "ours")
    naive.save_pretrained(tmp_path / "naive")
    saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    expected = load_file(tmp_path / "naive" / "adapter_model.safetensors")
    assert sorted(saved) == sorted(expected)
    assert all(torch.equal(saved[k], expected[k]) for k in saved)
    with torch.no_grad():
        naive_loss = naive(input_ids, labels=labels).loss
        loaded = PeftModel.from_pretrained(_base(), tmp_path / "ours").eval()
        torch.testing.assert_close(loaded(input_ids, labels=labels).loss, naive_loss)
        torch.testing.assert_close(
            ours(input_ids, labels=labels).loss, naive_loss, rtol=1e-5, atol=0
        )

    options = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    assert torch.equal(ours.generate(input_ids=input_ids[:2, :5], **options),
                       naive.generate(input_ids=input_ids[:2, :5], **options))  # fmt: skip

    merged, naive_merged = ours.merge_and_unload(), naive.merge_and_unload()
    assert isinstance(merged.lm_head, cl.ChunkedLMHead)  # still wrapped
    assert torch.equal(merged.lm_head.weight, naive_merged.lm_head.weight)
    with torch.no_grad():
        torch.testing.assert_close(
            merged(input_ids, labels=labels).loss, naive_merged(input_ids, labels=labels).loss,
            rtol=1e-5, atol=0,
        )  # fmt: skip


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("kind", KINDS)
def test_unwrap_gives_the_peft_layers_back(kind, order):
    model = _peft_model(kind, order)
    naive = _peft_model(kind, None)
    cl.ChunkedLMHead.unwrap(model)
    head, naive_head = model.base_model.model.lm_head, naive.base_model.model.lm_head
    inner = (
        [head.base_layer]
        if kind == "lora"
        else [head.original_module, *head.modules_to_save.values()]
    )
    assert all(type(layer) is torch.nn.Linear for layer in inner)
    assert "forward" not in vars(model.get_base_model())
    input_ids, labels = _batch()
    model.eval(), naive.eval()
    with torch.no_grad():
        assert torch.equal(
            model(input_ids, labels=labels).logits, naive(input_ids, labels=labels).logits
        )
    assert type(head) is type(naive_head)


def test_dora_on_the_head_is_refused():
    config = LoraConfig(r=4, target_modules=["lm_head"], use_dora=True, init_lora_weights=False)
    torch.manual_seed(1)
    model = get_peft_model(_base(), config)
    with pytest.raises(ValueError, match=r"refusing LlamaForCausalLM.*DoRA or another variant"):
        cl.ChunkedLMHead.wrap(model)
    assert type(model.base_model.model.lm_head.base_layer) is torch.nn.Linear
    wrapped = get_peft_model(cl.ChunkedLMHead.wrap(_base()), config)
    input_ids, labels = _batch()
    with pytest.raises(ValueError, match="DoRA or another variant"):
        wrapped(input_ids, labels=labels)
