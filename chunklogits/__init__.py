"""chunklogits: a language model's loss, log-probs and samplers without a ``[tokens, vocab]``
logits tensor."""

from . import distributed, memory, reference
from ._blocks import set_block_budget, set_block_compile, set_cpu_gemm_dtype
from .distill import linear_jsd
from .generate import sample
from .head import ChunkedLMHead
from .integrations.transformers import sequence_logprobs
from .logprobs import logsumexp, token_logprobs, topk_logprobs
from .loss import linear_cross_entropy, token_accuracy
from .sampling import sample_next

__all__ = [
    "ChunkedLMHead",
    "distributed",
    "linear_cross_entropy",
    "linear_jsd",
    "logsumexp",
    "memory",
    "reference",
    "sample",
    "sample_next",
    "sequence_logprobs",
    "set_block_budget",
    "set_block_compile",
    "set_cpu_gemm_dtype",
    "token_accuracy",
    "token_logprobs",
    "topk_logprobs",
]
__version__ = "0.1.0"
