"""Bad input gets a ValueError/TypeError naming the argument, what was expected and what came."""

from __future__ import annotations

import pytest
import torch

import chunklogits as cl

V, D = 20, 8


def good():
    return torch.randn(2, 5, D), torch.randn(V, D), torch.randint(0, V, (2, 5))


@pytest.mark.parametrize(
    "change, error, words",
    [
        (
            {"labels": torch.tensor([[0, 1, 2, 3, V]] * 2)},
            ValueError,
            ["labels", "[0, 20)", "got 20"],
        ),
        (
            {"labels": torch.tensor([[0, 1, 2, 3, -5]] * 2)},
            ValueError,
            ["labels", "ignore_index=-100", "got -5"],
        ),
        (
            {"labels": torch.zeros(2, 4, dtype=torch.long)},
            ValueError,
            ["labels", "(2, 5)", "(2, 4)"],
        ),
        ({"labels": torch.zeros(2, 5)}, TypeError, ["labels", "integer", "float32"]),
        (
            {"weight": torch.randn(V, D + 1)},
            ValueError,
            ["weight", "D = hidden.shape[-1] = 8", "(20, 9)"],
        ),
        ({"weight": torch.randn(V, D, 1)}, ValueError, ["weight", "[V, D]", "(20, 8, 1)"]),
        (
            {"weight": torch.randn(V, D, dtype=torch.float64)},
            TypeError,
            ["weight", "float32", "float64"],
        ),
        (
            {"hidden": torch.ones(2, 5, D, dtype=torch.long)},
            TypeError,
            ["hidden", "floating", "int64"],
        ),
        ({"hidden": [[0.0] * D]}, TypeError, ["hidden", "torch.Tensor", "list"]),
        ({"bias": torch.randn(V + 1)}, ValueError, ["bias", "[20]", "(21,)"]),
        ({"shards": 0}, ValueError, ["shards", "[1, 20]", "got 0"]),
        ({"shards": V + 1}, ValueError, ["shards", "[1, 20]", "got 21"]),
        ({"shards": 2.5}, TypeError, ["shards", "int", "float"]),
        ({"chunk_size": 0}, ValueError, ["chunk_size", ">= 1", "got 0"]),
        ({"reduction": "avg"}, ValueError, ["reduction", "'mean'", "'avg'"]),
        ({"label_smoothing": 1.5}, ValueError, ["label_smoothing", "[0, 1.0]", "1.5"]),
        ({"z_loss": -1.0}, ValueError, ["z_loss", ">= 0", "-1.0"]),
        ({"z_loss": float("nan")}, ValueError, ["z_loss", ">= 0", "nan"]),
        ({"ignore_index": 1.5}, TypeError, ["ignore_index", "an int", "1.5"]),
        ({"ignore_index": True}, TypeError, ["ignore_index", "an int", "True"]),
        ({"softcap": 0.0}, ValueError, ["softcap", "> 0", "0.0"]),
        ({"logit_scale": float("nan")}, ValueError, ["logit_scale", "finite", "nan"]),
        ({"num_items_in_batch": 0}, ValueError, ["num_items_in_batch", "positive", "0"]),
        (
            {"num_items_in_batch": 4, "reduction": "sum"},
            ValueError,
            ["num_items_in_batch", "'mean'", "'sum'"],
        ),
        (
            {"hidden": torch.randn(D), "labels": torch.tensor(1), "shift": True},
            ValueError,
            ["hidden", "shift=True", "(8,)"],
        ),
    ],
)
def test_linear_cross_entropy_errors(change, error, words):
    hidden, weight, labels = good()
    kwargs = {"hidden": hidden, "weight": weight, "labels": labels, **change}
    with pytest.raises(error) as caught:
        cl.linear_cross_entropy(**kwargs)
    for word in words:
        assert word in str(caught.value), f"{word!r} not in {caught.value}"


@pytest.mark.parametrize(
    "change, error, words",
    [
        ({"tokens": torch.full((2, 5), V)}, ValueError, ["tokens", "[0, 20)", "got 20"]),
        ({"tokens": torch.full((2, 5), -100)}, ValueError, ["tokens", "[0, 20)", "got -100"]),
        ({"tokens": torch.zeros(5, dtype=torch.long)}, ValueError, ["tokens", "(2, 5)", "(5,)"]),
        ({"temperature": 0.0}, ValueError, ["temperature", "> 0", "0.0"]),
        ({"temperature": None}, TypeError, ["temperature", "positive float", "None"]),
    ],
)
def test_token_logprobs_errors(change, error, words):
    hidden, weight, tokens = good()
    kwargs = {"hidden": hidden, "weight": weight, "tokens": tokens, **change}
    with pytest.raises(error) as caught:
        cl.token_logprobs(**kwargs)
    for word in words:
        assert word in str(caught.value), f"{word!r} not in {caught.value}"


def test_logsumexp_and_budget_errors():
    hidden, weight, _ = good()
    with pytest.raises(ValueError, match=r"shards: expected an int in \[1, 20\], got 30"):
        cl.logsumexp(hidden, weight, shards=30)
    with pytest.raises(ValueError, match=r"nbytes: expected an int >= 65536, got 10"):
        cl.set_block_budget(10)
