"""transformers.Trainer on a wrapped model, against the same Trainer on the unwrapped model:
evaluation metrics written as users write them (run_clm's argmax + accuracy), the logits-free
evaluation of the loss, label smoothing and compute_loss_func (warned, same numbers), and bf16
mixed-precision training."""

import copy

import numpy as np
import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

import chunklogits as cl
from tests.helpers import (
    assert_as_accurate,
    assert_as_accurate_in_norm,
    one_thread,
    seeded,
    tiny_llama_config,
    training_arguments,
)

pytestmark = pytest.mark.usefixtures(one_thread.__name__)

VOCAB = 211


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_llama_config(VOCAB)).to(dtype)


def _rows(seed: int, count: int = 6, length: int = 10) -> list[dict]:
    g = seeded(seed)
    input_ids = torch.randint(3, VOCAB, (count, length), generator=g)
    labels = input_ids.clone()
    labels[1, :6] = -100  # a prompt
    labels[2, -3:] = -100  # padding
    return [{"input_ids": i, "labels": lab} for i, lab in zip(input_ids, labels, strict=True)]


# run_clm (transformers/examples/pytorch/language-modeling/run_clm.py): argmax of the logits per
# batch, then accuracy of the shifted predictions over the non-ignored labels.
def preprocess_logits_for_metrics(logits, labels):
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(dim=-1)


def compute_metrics(eval_preds):
    preds, labels = eval_preds
    labels, preds = labels[:, 1:].reshape(-1), preds[:, :-1].reshape(-1)
    kept = labels != -100
    return {"accuracy": float(np.mean(preds[kept] == labels[kept]))}


def _evaluate(model, tmp_path, **overrides):
    trainer = transformers.Trainer(
        model=model,
        args=training_arguments(tmp_path, **overrides),
        eval_dataset=_rows(3),
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics,
    )
    return trainer.evaluate(), trainer.predict(_rows(4))


def test_evaluate_and_predict_metrics_as_run_clm_writes_them(tmp_path):
    """eval_loss and token accuracy of a wrapped model equal the unwrapped model's: in eval
    mode the wrapped model hands each batch's logits to preprocess_logits_for_metrics."""
    model = _model()
    wrapped = cl.ChunkedLMHead.wrap(copy.deepcopy(model), shards=3)
    theirs, their_predictions = _evaluate(model, tmp_path / "plain")
    ours, our_predictions = _evaluate(wrapped, tmp_path / "wrapped")
    assert set(ours) == set(theirs) and "eval_accuracy" in ours
    assert ours["eval_accuracy"] == theirs["eval_accuracy"]
    assert ours["eval_loss"] == pytest.approx(theirs["eval_loss"], rel=1e-5)
    assert np.array_equal(our_predictions.predictions, their_predictions.predictions)
    assert np.array_equal(our_predictions.label_ids, their_predictions.label_ids)
    for key in ("test_loss", "test_accuracy"):
        assert our_predictions.metrics[key] == pytest.approx(
            their_predictions.metrics[key], rel=1e-5
        )


def test_logits_free_evaluation_of_the_loss(tmp_path):
    """return_logits=False and prediction_loss_only=True: the eval loss, no logits made."""
    model = _model()
    wrapped = cl.ChunkedLMHead.wrap(copy.deepcopy(model), return_logits=False)
    theirs, _ = _evaluate(model, tmp_path / "plain", prediction_loss_only=True)
    ours, predictions = _evaluate(wrapped, tmp_path / "wrapped", prediction_loss_only=True)
    assert ours["eval_loss"] == pytest.approx(theirs["eval_loss"], rel=1e-5)
    assert predictions.predictions is None
    wrapped.eval()
    batch = _rows(3)[0]
    with torch.no_grad():
        assert wrapped(batch["input_ids"][None], labels=batch["labels"][None]).logits is None


def _train(model, tmp_path, **overrides):
    trainer = transformers.Trainer(
        model=model, args=training_arguments(tmp_path, **overrides), train_dataset=_rows(5, count=8)
    )
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry], model


def _smoothed_loss(outputs, labels, num_items_in_batch=None):
    """A compute_loss_func as users write one: label-smoothed cross-entropy of the logits."""
    logits = outputs.logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, label_smoothing=0.2
    )


@pytest.mark.parametrize(
    "overrides",
    [{"label_smoothing_factor": 0.1}, {"compute_loss_func": _smoothed_loss}],
    ids=["label_smoothing_factor", "compute_loss_func"],
)
def test_losses_from_logits_outside_the_model_warn(overrides, tmp_path):
    """Trainer takes these losses from logits it asks the model for without labels: the wrapped
    model says that it made the full logits (instead of doing so silently), and the numbers are
    the unwrapped model's."""
    compute_loss_func = overrides.pop("compute_loss_func", None)
    model = _model()
    wrapped = cl.ChunkedLMHead.wrap(copy.deepcopy(model))

    def train(m, path):
        trainer = transformers.Trainer(
            model=m,
            args=training_arguments(path, max_steps=2, **overrides),
            train_dataset=_rows(5, count=8),
            compute_loss_func=compute_loss_func,
        )
        trainer.train()
        return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    theirs = train(model, tmp_path / "plain")
    with pytest.warns(UserWarning, match="label_smoothing_factor or compute_loss_func"):
        ours = train(wrapped, tmp_path / "wrapped")
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)


def test_bf16_mixed_precision_training(tmp_path):
    """Trainer(bf16=True) on CPU: accelerate runs the forward under bf16 autocast and the
    wrapped head's blocks run in bf16 like the unwrapped head's F.linear; the loss and the
    updated parameters are as accurate as the unwrapped bf16 run's, against an fp64 run."""
    model = _model()
    wrapped = cl.ChunkedLMHead.wrap(copy.deepcopy(model))
    exact = _model(torch.float64)
    ours, ours_trained = _train(wrapped, tmp_path / "wrapped", bf16=True)
    theirs, trained = _train(model, tmp_path / "plain", bf16=True)
    truth, exact_trained = _train(exact, tmp_path / "exact")
    assert_as_accurate(torch.tensor(ours), torch.tensor(theirs), torch.tensor(truth),
                       torch.bfloat16, "bf16 training loss")  # fmt: skip
    vectors = (
        torch.cat([p.detach().flatten().double() for p in m.parameters()])
        for m in (ours_trained, trained, exact_trained)
    )
    assert_as_accurate_in_norm(*vectors, torch.bfloat16, "parameters after a bf16 step")
