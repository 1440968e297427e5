"""The recipes of docs/usage.md give what the code they replace gives: transformers' own loss
and gradients, the stock Trainer's training run, and TRL's per-token log-probs."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from chunklogits.benchmark import selective_log_softmax
from tests.helpers import one_thread, tiny_llama_config
from tests.test_docs import definitions

pytestmark = pytest.mark.usefixtures(one_thread.__name__)


# The recipes as docs/usage.md writes them.
RECIPES = definitions("docs/usage.md", {})
causal_lm_loss = RECIPES["causal_lm_loss"]
ChunkedLossTrainer = RECIPES["ChunkedLossTrainer"]
completion_logprobs = RECIPES["completion_logprobs"]


VOCAB = 211


# Families whose forward transforms the logits, with transforms that change random-init logits
# (O(0.1)) visibly: what causal_lm_loss must reproduce through logit_transform.
TRANSFORMED = {
    "gemma2": ("Gemma2Config", {"head_dim": 12, "final_logit_softcapping": 0.2}),
    "cohere": ("CohereConfig", {"logit_scale": 5.0}),
    "granite": ("GraniteConfig", {"logits_scaling": 0.2}),
}


def tiny_model(seed: int = 0, family: str = "llama"):
    torch.manual_seed(seed)
    config = tiny_llama_config(VOCAB, hidden=48)
    if family != "llama":
        name, fields = TRANSFORMED[family]
        config = getattr(transformers, name)(**{**config.to_diff_dict(), **fields})
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def padded_batch(seed: int = 0):
    """Right-padded ids [3, 12], their mask, and labels with the padding and a prompt ignored."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[2, 5:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :4] = -100
    return ids, mask, labels


@pytest.mark.parametrize("family", ["llama", *TRANSFORMED])
def test_causal_lm_loss_and_gradients_equal_transformers(family):
    model = tiny_model(family=family)
    ids, mask, labels = padded_batch()
    expected = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    expected.backward()
    expected_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ours = causal_lm_loss(model, ids, labels, mask)
    ours.backward()
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    for got, want in zip((p.grad for p in model.parameters()), expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def _train(trainer_class, tmp_path):
    model = tiny_model(seed=1)
    ids, mask, labels = padded_batch(seed=2)
    rows = [
        {"input_ids": i, "attention_mask": m, "labels": y}
        for i, m, y in zip(ids.repeat(2, 1), mask.repeat(2, 1), labels.repeat(2, 1), strict=True)
    ]
    args = TrainingArguments(
        output_dir=str(tmp_path / trainer_class.__name__),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=2,
        learning_rate=1e-2,
        optim="sgd",  # updates linear in the gradients: Adam would amplify rounding where g ~ 0
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        data_seed=0,
    )
    trainer = trainer_class(model=model, args=args, train_dataset=rows)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return model, losses


def test_trainer_override_trains_like_the_stock_trainer(tmp_path):
    stock, stock_losses = _train(Trainer, tmp_path)
    ours, our_losses = _train(ChunkedLossTrainer, tmp_path)
    assert len(our_losses) == len(stock_losses) == 2
    assert our_losses == pytest.approx(stock_losses, abs=1e-5)
    for got, want in zip(ours.parameters(), stock.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_completion_logprobs_equal_trl_on_the_logits():
    model = tiny_model(seed=3)
    ids, mask, _ = padded_batch(seed=4)
    keep, temperature = 7, 0.7
    logprobs, entropy = completion_logprobs(model, ids, mask, keep, temperature=temperature)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, -keep - 1 : -1] / temperature
    torch.testing.assert_close(logprobs, selective_log_softmax(logits, ids[:, -keep:]))
    logp = logits.log_softmax(-1)
    torch.testing.assert_close(entropy, -(logp.exp() * logp).sum(-1))
    assert logprobs.requires_grad and entropy.requires_grad


def test_trainer_override_evaluates_and_predicts_like_the_stock_trainer(tmp_path):
    """evaluate/predict call compute_loss(return_outputs=True) and read outputs[1:]: the
    recipe's outputs give the stock eval loss, with and without prediction_loss_only."""
    model = tiny_model(seed=5, family="gemma2")
    ids, mask, labels = padded_batch(seed=6)
    rows = [
        {"input_ids": i, "attention_mask": m, "labels": y}
        for i, m, y in zip(ids, mask, labels, strict=True)
    ]
    for loss_only in (False, True):
        args = TrainingArguments(
            output_dir=str(tmp_path),
            per_device_eval_batch_size=2,
            prediction_loss_only=loss_only,
            report_to=[],
            use_cpu=True,
        )
        stock = Trainer(model=model, args=args, eval_dataset=rows)
        ours = ChunkedLossTrainer(model=model, args=args, eval_dataset=rows)
        expected = stock.evaluate()["eval_loss"]
        assert ours.evaluate()["eval_loss"] == pytest.approx(expected, rel=1e-5)
        predicted = ours.predict(rows)
        assert predicted.metrics["test_loss"] == pytest.approx(expected, rel=1e-5)
