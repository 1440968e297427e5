"""chunklogits.integrations.trl: TRL 1.16's SFT, DPO and GRPO trainers with chunklogits' head.

Each trainer runs twice from the same weights and data, once with TRL's own fused LM head and
once after ``use_chunklogits``: in fp32 the logged losses and metrics and the parameters after
the steps agree within rounding, TRL's kernel is not called by the second run and chunklogits'
engine is. Under ``bf16=True`` (TRL's default: autocast) the first step's loss is compared with
the fp64 loss of the same hidden states. Tiny Llama, word-level tokenizer built in memory.
"""

from __future__ import annotations

import copy
import math
import subprocess
import sys
import types

import datasets
import pytest
import torch
import trl.kernels.chunked_logprob as trl_kernel

import chunklogits._blocks as blocks
from chunklogits import ChunkedLMHead, reference
from chunklogits.integrations.trl import use_chunklogits
from tests.helpers import (
    assert_as_accurate,
    assert_as_accurate_in_norm,
    one_thread,
    tiny_llama_config,
)

pytestmark = pytest.mark.usefixtures(one_thread.__name__)

WORDS = ["the", "a", "cat", "dog", "sat", "ran", "on", "under", "mat", "log", "big", "small"]
WORDS += ["red", "blue", "and", "very"]
TEXTS = [
    "the cat sat on the mat",
    "a dog ran under the log",
    "the big red cat ran",
    "a small blue dog sat on a mat and ran",
]
# Logged values that are wall-clock times, not results.
TIMINGS = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "step_time")


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=word_level, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def base_model(tokenizer):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    # V = 22: the 19 tokens plus 3 unused rows, so the vocabulary is not the tokenizer's.
    config = tiny_llama_config(len(tokenizer) + 3, pad_token_id=0, eos_token_id=1)
    return LlamaForCausalLM(config).eval()


class _Counter:
    """Counts the calls of a module-level function, calling it through; keeps the last call's
    positional arguments."""

    def __init__(self, monkeypatch, module, name: str):
        self.calls, self.last_args, original = 0, None, getattr(module, name)

        def counted(*args, **kwargs):
            self.calls += 1
            self.last_args = args
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)


def _train(
    trainer_class, config_class, model, tokenizer, tmp_path, ours, monkeypatch, record=None, **kw
):
    """Train ``model`` (a copy of it, or a saved copy's path) and return (the trained model, log
    history without timings, engine calls, TRL kernel calls)."""
    if isinstance(model, torch.nn.Module):
        model = copy.deepcopy(model)
    ours_calls = _Counter(monkeypatch, blocks, "_forward_stats")
    trl_calls = _Counter(monkeypatch, trl_kernel, "_forward_tile")
    dataset, options = kw.pop("train_dataset"), kw.pop("trainer_options", {})
    defaults = dict(
        output_dir=str(tmp_path / ("ours" if ours else "trl")),
        per_device_train_batch_size=2,
        optim="sgd",  # parameters then differ by lr x the gradients' difference
        learning_rate=0.1,
        logging_steps=1,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        seed=0,
    )
    args = config_class(**{**defaults, **kw})
    trainer = trainer_class(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, **options
    )
    if ours:
        assert use_chunklogits(trainer) is trainer
    if record is not None:
        compute_loss = trainer.compute_loss

        def recorded(model, inputs, **kwargs):
            record.append(dict(inputs))
            return compute_loss(model, inputs, **kwargs)

        trainer.compute_loss = recorded
    trainer.train()
    history = [
        {k: v for k, v in log.items() if k not in TIMINGS} for log in trainer.state.log_history
    ]
    return trainer.model, history, ours_calls.calls, trl_calls.calls


def _assert_same_training(run, rel=2e-5):
    """TRL's head and chunklogits' give the same logs and parameters (fp32, within rounding)."""
    theirs_model, theirs, engine_theirs, kernel_theirs = run(False)
    ours_model, ours, engine_ours, kernel_ours = run(True)
    assert kernel_theirs > 0 and engine_theirs == 0, "TRL's run: its own kernel computes the head"
    assert kernel_ours == 0 and engine_ours > 0, "after use_chunklogits: chunklogits' engine does"
    return _assert_same_logs_and_parameters(ours_model, ours, theirs_model, theirs, rel)


def _assert_same_logs_and_parameters(ours_model, ours, theirs_model, theirs, rel):
    assert [log.keys() for log in ours] == [log.keys() for log in theirs]
    for step, (mine, their) in enumerate(zip(ours, theirs, strict=True)):
        for key, value in their.items():
            assert mine[key] == pytest.approx(value, rel=rel, abs=1e-5), f"step {step}: {key}"
    for (name, p), q in zip(ours_model.named_parameters(), theirs_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    return ours


def test_sft_trainer_same_losses_metrics_and_parameters(
    base_model, tokenizer, tmp_path, monkeypatch
):
    from trl import SFTConfig, SFTTrainer

    dataset = datasets.Dataset.from_dict({"text": TEXTS})

    def run(ours):
        return _train(
            SFTTrainer, SFTConfig, base_model, tokenizer, tmp_path, ours, monkeypatch,
            train_dataset=dataset, max_steps=2, bf16=False,
        )  # fmt: skip

    logs = _assert_same_training(run)
    assert {"loss", "entropy", "mean_token_accuracy"} <= logs[0].keys()


def test_sft_trainer_peft_model(base_model, tokenizer, tmp_path, monkeypatch):
    """LoRA through ``peft_config``: TRL installs its head on the PEFT model's base model, and so
    does use_chunklogits."""
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    dataset = datasets.Dataset.from_dict({"text": TEXTS})
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)

    def run(ours):
        return _train(
            SFTTrainer, SFTConfig, base_model, tokenizer, tmp_path, ours, monkeypatch,
            train_dataset=dataset, max_steps=2, bf16=False, trainer_options={"peft_config": lora},
        )  # fmt: skip

    logs = _assert_same_training(run)
    assert logs[0]["grad_norm"] > 0  # the adapters were trained


PREFERENCES = {
    "prompt": ["the cat", "a dog", "the big", "a small"],
    "chosen": [" sat on the mat", " ran under the log", " red cat ran", " blue dog sat"],
    "rejected": [" mat the on", " log ran", " cat cat", " dog and very"],
}


def _dpo_run(model, tokenizer, tmp_path, monkeypatch, **kw):
    """``run(ours)`` for ``_assert_same_training``: two DPO steps against a copy of ``model``."""
    from trl import DPOConfig, DPOTrainer

    dataset = datasets.Dataset.from_dict(PREFERENCES)

    def run(ours):
        return _train(
            DPOTrainer, DPOConfig, model, tokenizer, tmp_path, ours, monkeypatch,
            train_dataset=dataset, max_steps=2, bf16=False, beta=0.1,
            trainer_options={"ref_model": copy.deepcopy(model)}, **kw,
        )  # fmt: skip

    return run


def test_dpo_trainer_same_losses_metrics_and_parameters(
    base_model, tokenizer, tmp_path, monkeypatch
):
    logs = _assert_same_training(_dpo_run(base_model, tokenizer, tmp_path, monkeypatch))
    assert {"loss", "logps/chosen", "logits/chosen", "mean_token_accuracy"} <= logs[0].keys()


def test_dpo_trainer_use_weighting(base_model, tokenizer, tmp_path, monkeypatch):
    """WPO's weights (``use_weighting=True``) read ``log_sum_sq_probs``: the same training."""
    run = _dpo_run(base_model, tokenizer, tmp_path, monkeypatch, use_weighting=True)
    logs = _assert_same_training(run)
    # At the first step the policy is the reference: DPO's loss is log 2 times the weights.
    assert logs[0]["loss"] != pytest.approx(math.log(2), rel=1e-3)


def test_dpo_trainer_moe_aux_loss(tokenizer, tmp_path, monkeypatch):
    """A tiny Mixtral whose config asks for router logits, ``router_aux_loss_coef = 0.1``: the
    load-balancing loss TRL's DPO adds (and logs as ``aux_loss``) comes through the fused
    forward use_chunklogits installs, equal to TRL's."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=len(tokenizer) + 3, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=128, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
        output_router_logits=True, router_aux_loss_coef=0.1,
    )  # fmt: skip
    torch.manual_seed(0)
    model = MixtralForCausalLM(config).eval()
    logs = _assert_same_training(_dpo_run(model, tokenizer, tmp_path, monkeypatch))
    # num_experts x sum_i (tokens' share routed to i x mean router probability of i): about
    # num_experts_per_tok = 2 for the nearly balanced routing of a freshly initialised router.
    assert [log["aux_loss"] for log in logs[:2]] == pytest.approx([2.0, 2.0], rel=0.05)


def _reward_length(completions, **kwargs):
    return [float(len(completion)) for completion in completions]


def test_grpo_trainer_same_losses_metrics_and_parameters(
    base_model, tokenizer, tmp_path, monkeypatch
):
    from trl import GRPOConfig, GRPOTrainer

    dataset = datasets.Dataset.from_dict({"prompt": ["the cat", "a dog", "the big", "a small"]})

    # beta > 0: a reference model (which GRPOTrainer loads from the policy's path), whose fused
    # head is replaced too; temperature 0.7 reaches the log-probs and the entropy.
    path = tmp_path / "base"
    base_model.save_pretrained(path)
    tokenizer.save_pretrained(path)

    def run(ours):
        return _train(
            GRPOTrainer, GRPOConfig, str(path), tokenizer, tmp_path, ours, monkeypatch,
            train_dataset=dataset, max_steps=2, bf16=False, beta=0.1, temperature=0.7,
            num_generations=2, max_completion_length=4,
            trainer_options={"reward_funcs": _reward_length},
        )  # fmt: skip

    logs = _assert_same_training(run)
    # The rewards differ within each group (non-zero advantages) and the policy has left the
    # reference model by the second step: both terms of the loss were exercised.
    assert logs[0]["reward_std"] > 0 and logs[1]["kl"] > 0 and logs[0]["grad_norm"] > 0


def test_sft_trainer_with_wrapped_model_uses_its_head(base_model, tokenizer, tmp_path, monkeypatch):
    """A ChunkedLMHead.wrap-ped model: use_chunklogits takes its head (and shard count); the
    training equals TRL's on the unwrapped model."""
    from trl import SFTConfig, SFTTrainer

    dataset = datasets.Dataset.from_dict({"text": TEXTS})
    wrapped = ChunkedLMHead.wrap(copy.deepcopy(base_model), shards=3)
    engine = _Counter(monkeypatch, blocks, "_forward_stats")

    def run(ours):
        return _train(
            SFTTrainer, SFTConfig, wrapped if ours else base_model, tokenizer, tmp_path, ours,
            monkeypatch, train_dataset=dataset, max_steps=1, bf16=False,
        )  # fmt: skip

    _assert_same_training(run)
    plan = engine.last_args[
        6
    ]  # _forward_stats(hidden2d, weight, bias, index, targets, transform, plan, ...)
    assert len(plan.shards) == 3


def test_sft_trainer_bf16_loss_as_accurate_as_trl(base_model, tokenizer, tmp_path, monkeypatch):
    """``bf16=True`` (TRL's default: the forward under bf16 autocast): the first step's loss is
    the fp64 loss of the autocast hidden states at least as closely as TRL's bf16 head gets it."""
    from trl import SFTConfig, SFTTrainer

    dataset = datasets.Dataset.from_dict({"text": TEXTS})
    seen = []

    def run(ours):
        model, logs, *_ = _train(
            SFTTrainer, SFTConfig, base_model, tokenizer, tmp_path, ours, monkeypatch,
            train_dataset=dataset, max_steps=1, bf16=True, learning_rate=0.0,
            record=seen,
        )  # fmt: skip
        return model, logs[0]["loss"]

    _, theirs = run(False)
    model, ours = run(True)
    assert math.isfinite(ours)
    batch = seen[-1]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    hidden = hidden.last_hidden_state[:, :-1].double()
    logits = hidden @ model.lm_head.weight.double().T
    labels = batch["labels"][:, 1:]
    exact = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
    as_tensor = torch.tensor
    assert_as_accurate(as_tensor(ours), as_tensor(theirs), exact, torch.bfloat16, "bf16 loss")
    assert abs(ours - exact.item()) < 1e-5 * exact.item()  # the head ran in fp32


CHATS = [
    ("the cat", "sat on the mat"),
    ("a dog", "ran under the log"),
    ("the big", "red cat ran"),
    ("a small", "blue dog sat on a mat"),
]


@pytest.fixture(scope="module")
def chat_tokenizer(tokenizer):
    """The word-level tokenizer with a chat template: the messages' contents one after another."""
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return chat


def chat_dataset():
    """GKD's conversational rows: the prompt as text, the messages for the chat template."""
    return datasets.Dataset.from_dict(
        {
            "prompt": [prompt + " " for prompt, _ in CHATS],
            "messages": [
                [{"role": "user", "content": p}, {"role": "assistant", "content": c}]
                for p, c in CHATS
            ],
        }
    )


def _gkd_models(vocab: int, dtype=torch.float32):
    """A student and a larger teacher (other depth and hidden size), fixed weights; their heads
    scaled up so that their next-token distributions are peaked and far apart, as a trained
    model's are (at initialisation both are near uniform and the divergence ~1e-3)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    student = LlamaForCausalLM(tiny_llama_config(vocab, hidden=32, pad_token_id=0))
    teacher = LlamaForCausalLM(tiny_llama_config(vocab, layers=3, hidden=48, pad_token_id=0))
    with torch.no_grad():
        for model in (student, teacher):
            model.lm_head.weight.mul_(20.0)
    return student.to(dtype), teacher.to(dtype)


def _gkd_trainer(student, teacher, chat_tokenizer, tmp_path, **kw):
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    dataset = chat_dataset()
    defaults = dict(
        output_dir=str(tmp_path / "gkd"), per_device_train_batch_size=2, optim="sgd",
        learning_rate=0.1, logging_steps=1, use_cpu=True, report_to=[], save_strategy="no",
        seed=0, bf16=False, max_new_tokens=4,
    )  # fmt: skip
    args = GKDConfig(**{**defaults, **kw})
    return GKDTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=dataset,
        processing_class=chat_tokenizer,
    )


def _gkd_loss_and_grads(trainer, inputs, num_items_in_batch):
    model = trainer.model
    model.zero_grad()
    loss = trainer.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
    loss.backward()
    head = model.get_output_embeddings().weight.grad.clone()
    return loss.detach(), head, model.get_input_embeddings().weight.grad.clone()


@pytest.mark.parametrize(("beta", "num_items"), [(0.5, None), (0.0, 13), (1.0, None)])
def test_gkd_compute_loss_equals_trainers_own(chat_tokenizer, tmp_path, beta, num_items):
    """``use_chunklogits`` on TRL's GKDTrainer: ``compute_loss`` (linear_jsd of the student's
    and the teacher's hidden states) equals GKDTrainer's own on both models' logits, loss and
    student gradients, against the same trainer in fp64; neither model's logits are formed."""
    vocab = len(chat_tokenizer) + 3
    batch = next(iter(_gkd_trainer(*_gkd_models(vocab), chat_tokenizer, tmp_path, beta=beta)
                      .get_train_dataloader()))  # fmt: skip
    assert (batch["labels"] == -100).any() and (batch["labels"] != -100).any()
    results = {}
    for name, dtype, ours in (
        ("ours", torch.float32, True),
        ("naive", torch.float32, False),
        ("exact", torch.float64, False),
    ):
        trainer = _gkd_trainer(*_gkd_models(vocab, dtype), chat_tokenizer, tmp_path, beta=beta)
        if ours:
            assert use_chunklogits(trainer) is trainer
            switched = trainer.compute_loss
            assert use_chunklogits(trainer).compute_loss == switched  # a second call: no-op
            for model in (trainer.model, trainer.teacher_model):
                model.get_output_embeddings().forward = None  # no logits are computed
        results[name] = _gkd_loss_and_grads(trainer, batch, num_items)
    what = f"beta={beta}, num_items_in_batch={num_items}"
    ours, naive, exact = results.values()
    assert_as_accurate(ours[0], naive[0], exact[0], torch.float32, f"loss {what}")
    assert_as_accurate(ours[1], naive[1], exact[1], torch.float32, f"lm_head grad {what}")
    # Upstream of the head both runs go through the same fp32 decoder backward.
    assert_as_accurate_in_norm(ours[2], naive[2], exact[2], torch.float32, f"embed grad {what}")


def test_gkd_trainer_same_losses_and_parameters(chat_tokenizer, tmp_path, monkeypatch):
    """Three GKD steps, on-policy (completions sampled from the student, as TRL does) and off
    it: the same losses and parameters as GKDTrainer's own loss on both models' logits, which
    the chunklogits run never forms (TRL's GKD loss is not called, linear_jsd is)."""
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    import chunklogits.integrations.trl as integration

    student, teacher = _gkd_models(len(chat_tokenizer) + 3)
    generated = []
    generate = GKDTrainer.generate_on_policy_outputs

    def counted(*args, **kwargs):
        generated.append(1)
        return generate(*args, **kwargs)

    monkeypatch.setattr(GKDTrainer, "generate_on_policy_outputs", staticmethod(counted))

    def run(ours):
        jsd = _Counter(monkeypatch, integration, "linear_jsd")
        trl_loss = _Counter(monkeypatch, GKDTrainer, "generalized_jsd_loss")
        monkeypatch.setattr(
            GKDTrainer, "generalized_jsd_loss", staticmethod(GKDTrainer.generalized_jsd_loss)
        )
        generated.clear()
        model, logs, *_ = _train(
            GKDTrainer, GKDConfig, student, chat_tokenizer, tmp_path, ours, monkeypatch,
            train_dataset=chat_dataset(), max_steps=3, bf16=False, lmbda=0.5, beta=0.5,
            max_new_tokens=4,
            trainer_options={"teacher_model": copy.deepcopy(teacher)},
        )  # fmt: skip
        return model, logs, jsd.calls, trl_loss.calls, len(generated)

    theirs_model, theirs, jsd_theirs, trl_theirs, generated_theirs = run(False)
    ours_model, ours, jsd_ours, trl_ours, generated_ours = run(True)
    assert jsd_theirs == 0 and trl_theirs == 3, "TRL's run: its own loss on the logits"
    assert jsd_ours == 3 and trl_ours == 0, "after use_chunklogits: linear_jsd"
    assert 0 < generated_ours == generated_theirs < 3, "on-policy steps and off-policy ones"
    _assert_same_logs_and_parameters(ours_model, ours, theirs_model, theirs, rel=2e-5)


def test_gkd_refuses_what_it_does_not_reproduce(chat_tokenizer, tmp_path):
    """A GKDTrainer subclass with its own loss, or a model whose logits are transformed (which
    linear_jsd does not apply): ValueError, and the trainer is left as TRL made it."""
    from trl.experimental.gkd import GKDTrainer

    student, teacher = _gkd_models(len(chat_tokenizer) + 3)
    trainer = _gkd_trainer(*map(copy.deepcopy, (student, teacher)), chat_tokenizer, tmp_path)
    trainer.teacher_model.config.final_logit_softcapping = 30.0
    forward = trainer.model.forward
    with pytest.raises(ValueError, match=r"teacher_model \(LlamaForCausalLM\).*softcap"):
        use_chunklogits(trainer)
    assert trainer.model.forward == forward and "compute_loss" not in vars(trainer)

    class OwnLoss(GKDTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    trainer = _gkd_trainer(student, teacher, chat_tokenizer, tmp_path)
    trainer.__class__ = OwnLoss
    with pytest.raises(ValueError, match=r"OwnLoss overrides GKDTrainer\.compute_loss"):
        use_chunklogits(trainer)


def _fused_pair(model, **options):
    """Two copies of ``model`` with TRL's fused head (``add_fused_lm_head(**options)``), the
    second switched to chunklogits'."""
    from trl.trainer.utils import add_fused_lm_head

    theirs, ours = copy.deepcopy(model), copy.deepcopy(model)
    for m in (theirs, ours):
        add_fused_lm_head(m, **options)
    use_chunklogits(types.SimpleNamespace(model=ours))
    return theirs, ours


def _batch(vocab: int, ignored: float = 0.3):
    g = torch.Generator().manual_seed(3)
    input_ids = torch.randint(3, vocab, (3, 9), generator=g)
    labels = input_ids.masked_fill(torch.rand(input_ids.shape, generator=g) < ignored, -100)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, :3] = 0  # a left-padded row
    labels[2, :3] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# Every per-token field TRL 1.16's add_fused_lm_head can be asked for.
ALL_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def _fused_results(model, batch):
    model.zero_grad()
    out = model(**batch, fused_lm_head=True)
    (out.loss + 0.1 * out.entropy.sum()).backward()
    fields = {k: getattr(out, k) for k in ("loss", *ALL_OUTPUTS)}
    return fields, [p.grad.clone() for p in model.parameters()]


def test_fused_forward_fields_and_gradients_match_trl(base_model):
    """Every field TRL's trainers read, at temperature 0.7 with a softcap read from the config,
    ignored labels and padding: the same values and gradients as TRL's head (fp32)."""
    model = copy.deepcopy(base_model)
    model.config.final_logit_softcapping = 3.0  # TRL and chunklogits both read it
    theirs, ours = _fused_pair(model, temperature=0.7, outputs=ALL_OUTPUTS)
    batch = _batch(model.config.vocab_size)
    expected, expected_grads = _fused_results(theirs, batch)
    got, grads = _fused_results(ours, batch)
    for key, value in expected.items():
        assert value is not None
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert got["is_top1"].any() or not expected["is_top1"].any()
    assert not got["log_sum_sq_probs"].requires_grad  # TRL's has no gradient either
    for mine, their in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(mine, their, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_fused_log_sum_sq_probs_as_accurate_as_trl(base_model, dtype, cpu_gemm):
    """``log_sum_sq_probs`` (DPO's use_weighting) is ``logsumexp(2 z) - 2 logsumexp(z)``, two
    fp32 log-sum-exps that cancel. On logits of a trained model's size (|z| up to ~40) it meets
    the accuracy rule against TRL's kernel and the fp64 value of the same hidden states. TRL
    subtracts the row maximum before its logarithms, so in fp32 its error is the smaller one
    (here 1.3e-6 against 3.1e-6, both far inside the rule's slack); for a bf16 model TRL rounds
    the logits to bf16 (3.4e-2), chunklogits with fp32 block GEMMs does not (2.0e-6)."""
    model = copy.deepcopy(base_model).to(dtype)
    with torch.no_grad():
        model.lm_head.weight.mul_(80.0)
    theirs, ours = _fused_pair(model, temperature=0.7, outputs=("log_probs", "log_sum_sq_probs"))
    batch = _batch(model.config.vocab_size)
    with torch.no_grad():
        got = ours(**batch, fused_lm_head=True).log_sum_sq_probs
        expected = theirs(**batch, fused_lm_head=True).log_sum_sq_probs
        hidden = ours.model(batch["input_ids"], attention_mask=batch["attention_mask"])
    mask = batch["labels"][:, 1:] != -100
    z = hidden.last_hidden_state[:, :-1][mask].double() @ model.lm_head.weight.detach().double().T
    z = z / 0.7
    assert z.abs().max() > 20  # large logits, where the cancellation would show
    exact = (2 * z).logsumexp(-1) - 2 * z.logsumexp(-1)
    assert_as_accurate(got[mask], expected[mask], exact, dtype, "log_sum_sq_probs")
    assert not got[~mask].any() and not expected[~mask].any()


def test_fused_forward_without_labelled_tokens_gives_zero_gradients(base_model):
    theirs, ours = _fused_pair(base_model, outputs=("log_probs", "entropy", "is_top1"))
    batch = _batch(base_model.config.vocab_size)
    batch["labels"] = torch.full_like(batch["labels"], -100)
    expected, expected_grads = _fused_results(theirs, batch)
    got, grads = _fused_results(ours, batch)
    assert got["loss"].item() == expected["loss"].item() == 0.0
    assert not got["log_probs"].any() and not got["is_top1"].any()
    for mine, their in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(mine, their, rtol=0, atol=0)


def test_fused_forward_bf16_model_as_accurate_as_naive(base_model, cpu_gemm):
    """A bf16 model: log-probs, entropies and the head's gradient at least as close to fp64 as
    the naive bf16 computation (reference.token_logprobs on the same hidden states)."""
    model = copy.deepcopy(base_model).to(torch.bfloat16)
    _, ours = _fused_pair(model, outputs=("log_probs", "entropy"))
    batch = _batch(model.config.vocab_size)
    out = ours(**batch, fused_lm_head=True)
    (out.log_probs.sum() + out.entropy.sum()).backward()
    with torch.no_grad():
        hidden = ours.model(batch["input_ids"], attention_mask=batch["attention_mask"])
    hidden = hidden.last_hidden_state[:, :-1]
    labels, weight = batch["labels"][:, 1:], ours.lm_head.weight
    mask = labels != -100
    results = {}
    for name, h, w in (
        ("naive", hidden[mask], weight.detach().clone().requires_grad_()),
        ("exact", hidden[mask].double(), weight.detach().double().requires_grad_()),
    ):
        logp, entropy = reference.token_logprobs(h, w, labels[mask], return_entropy=True)
        (logp.sum() + entropy.sum()).backward()
        results[name] = (logp, entropy, w.grad)
    ours_results = (out.log_probs[mask], out.entropy[mask], weight.grad)
    for what, mine, naive, exact in zip(
        ("log_probs", "entropy", "lm_head grad"), ours_results, *results.values(), strict=True
    ):
        assert_as_accurate(mine.detach(), naive.detach(), exact.detach(), torch.bfloat16, what)


def test_refuses_what_it_does_not_reproduce(base_model):
    from trl.trainer.utils import add_fused_lm_head

    with pytest.raises(ValueError, match="trainer: expected a TRL trainer"):
        use_chunklogits(types.SimpleNamespace(model=copy.deepcopy(base_model)))
    fused = copy.deepcopy(base_model)
    add_fused_lm_head(fused)
    with pytest.raises(ValueError, match=r"shards: expected an int in \[1, 22\], got 0"):
        use_chunklogits(types.SimpleNamespace(model=fused), shards=0)
    scaled = copy.deepcopy(base_model)
    scaled.config.output_multiplier = 2.0  # TRL reads it as a logit scale, chunklogits does not
    add_fused_lm_head(scaled)
    with pytest.raises(ValueError, match="logit transform"):
        use_chunklogits(types.SimpleNamespace(model=scaled))


def test_import_chunklogits_does_not_import_trl():
    code = "import sys, chunklogits; print('trl' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"
