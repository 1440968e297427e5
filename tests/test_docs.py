"""Every ```python block of README.md and docs/*.md runs as written, and its asserts hold.

A page's blocks run in the order they appear, in one namespace, as one script: a block may use
what an earlier block of its page defined (the text says so). One thing is substituted, so that
nothing is downloaded: ``AutoModelForCausalLM.from_pretrained(name, ...)`` builds a tiny randomly
initialised model of ``name``'s family (``TINY``), seeded by the name (the same name gives the
same weights, as a checkpoint would), in eval mode and in the ``dtype`` asked for, as
``from_pretrained`` returns a model. The blocks state their equivalences as ``assert``s a reader
can follow. A block preceded by ``<!-- docs-test: skip (reason) -->`` is not run; the reason says
where its content is tested. The blocks run on CPU, whatever the machine has.
"""

from __future__ import annotations

import ast
import re
import zlib
from pathlib import Path

import pytest
import torch
import transformers

from tests.helpers import one_thread

pytestmark = pytest.mark.usefixtures(one_thread.__name__)

ROOT = Path(__file__).resolve().parent.parent
PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
_MARK = re.compile(r"<!-- docs-test: (.*?) -->\s*$")

_SIZES = dict(
    vocab_size=256,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
# The checkpoints the pages load, as tiny configs of their families. Random-init logits are
# O(0.1): the softcap is set so that it changes the loss visibly (a real Gemma-2's is 30).
TINY = {
    "meta-llama/Llama-3.2-1B": transformers.LlamaConfig(**_SIZES, tie_word_embeddings=True),
    "google/gemma-2-2b": transformers.Gemma2Config(
        **_SIZES, head_dim=8, final_logit_softcapping=0.2
    ),
}


def blocks(page: str) -> list[tuple[int, str, str | None]]:
    """``(line, code, mark)`` of each ```python block of ``page``: the line of its first code
    line, its code, and the ``docs-test`` comment on the line before its fence, if any."""
    text = (ROOT / page).read_text()
    found = []
    for match in _FENCE.finditer(text):
        line = text.count("\n", 0, match.start(1)) + 1
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        mark = _MARK.search(before)
        found.append((line, match.group(1), mark.group(1) if mark else None))
    return found


def definitions(page: str, namespace: dict) -> dict:
    """The imports, functions and classes that ``page``'s blocks define, as written there (the
    rest of each block, which runs them, left out), executed into ``namespace``; returns it.
    Other tests take the pages' recipes from here rather than from a copy."""
    kinds = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef)
    for line, code, mark in blocks(page):
        if mark is None:
            tree = ast.parse("\n" * (line - 1) + code)
            tree.body = [node for node in tree.body if isinstance(node, kinds)]
            exec(compile(tree, str(ROOT / page), "exec"), namespace)
    return namespace


def _from_pretrained(name, *args, dtype=None, torch_dtype=None, **kwargs):
    if name not in TINY:
        raise ValueError(f"tests/test_docs.py: no tiny stand-in for {name!r}; add it to TINY")
    torch.manual_seed(zlib.crc32(name.encode()))
    model = transformers.AutoModelForCausalLM.from_config(TINY[name], attn_implementation="eager")
    dtype = dtype or torch_dtype or torch.float32
    return model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype).eval()


def run_page(page: str, monkeypatch, directory: Path) -> dict:
    """Run ``page``'s blocks in order in one namespace (in ``directory``, where a ``Trainer``
    may write); returns the namespace."""
    monkeypatch.setattr(
        transformers.AutoModelForCausalLM, "from_pretrained", staticmethod(_from_pretrained)
    )
    monkeypatch.chdir(directory)
    torch.manual_seed(0)
    namespace = {"__name__": f"docs:{page}"}
    for line, code, mark in blocks(page):
        if mark is not None and mark.startswith("skip"):
            continue
        assert mark is None, f"{page}:{line}: unknown docs-test mark {mark!r}"
        # Blank lines in front: a traceback gives the line in the page.
        exec(compile("\n" * (line - 1) + code, str(ROOT / page), "exec"), namespace)
    return namespace


def test_pages_are_found_and_their_blocks_parsed():
    assert {"README.md", "docs/usage.md"} <= set(PAGES)
    usage = blocks("docs/usage.md")
    assert len(usage) >= 10
    line, code, _ = usage[0]
    assert (ROOT / "docs/usage.md").read_text().splitlines()[line - 1] == code.splitlines()[0]
    skipped = [(page, line) for page in PAGES for line, _, mark in blocks(page) if mark]
    # keep the untested blocks few: the process-group block and the three TRL trainer blocks
    # (each needs a tokenizer and a data set; tests/test_trl.py runs those trainers)
    assert len(skipped) <= 4, skipped


@pytest.mark.parametrize("page", PAGES)
def test_every_block_of_the_page_runs_and_its_asserts_hold(page, monkeypatch, tmp_path):
    run_page(page, monkeypatch, tmp_path)
