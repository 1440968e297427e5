"""bench/gpu_benchmark.py without a GPU: its argument parsing, data model and report, and a dry
run of the whole script on a tiny shape on CPU (Triton kernels interpreted)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_benchmark", ROOT / "bench" / "gpu_benchmark.py")
gb = sys.modules["gpu_benchmark"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gb)


def test_parse_args():
    args = gb.parse_args([])
    assert args.shapes == ["cce-table1", "llama3"] and args.impls == list(gb.IMPLEMENTATIONS)
    assert (args.repeats, args.warmup, args.data, args.dry_run) == (5, 2, "zipf", False)
    assert gb.SHAPES["cce-table1"] == gb.Shape(8192, 2304, 256_000)
    assert gb.SHAPES["llama3"] == gb.Shape(8192, 4096, 128_256)
    with pytest.raises(SystemExit):
        gb.parse_args(["--repeats", "0"])
    with pytest.raises(SystemExit):
        gb.parse_args(["--impls", "unknown"])


def test_zipf_data_gives_the_label_a_logit_of_prior_plus_8():
    """The ``zipf`` data model of the docstring: logit = log-prior (hidden coordinate 0 is 1,
    weight column 0 the prior) + 8 for the label + noise: the unit noise of hidden and the
    label's random direction seen from the others', variance ``1 + 64 / (D - 1)``."""
    hidden, weight, labels = gb.make_inputs(
        gb.Shape(512, 257, 1000), "zipf", torch.float32, "cpu", 0
    )
    assert torch.all(hidden[:, 0] == 1)
    logits = hidden @ weight.T
    boost = logits.gather(1, labels[:, None]).squeeze(1) - weight[labels, 0]
    assert abs(boost.mean().item() - 8.0) < 0.2
    others = logits - weight[:, 0] - 8.0 * torch.nn.functional.one_hot(labels, 1000)
    assert others.std().item() == pytest.approx((1 + 64 / 256) ** 0.5, rel=0.05)


def _report(**times):
    report = gb.Report("tiny", gb.Shape(4, 3, 10), "bf16", "zipf", "GPU", 1000, 600)
    for name, ms in times.items():
        report.results.append(
            gb.Result(
                name,
                milliseconds=ms,
                peak_bytes=3 * 2**20,
                lower_bound_ratio=1.04,
                loss=2.5,
                accuracy="ok",
            )
        )
    report.results.append(gb.Result("naive-compiled", skipped="skipped: needs a CUDA GPU"))
    return report


def test_report_table_and_verdict():
    text = gb.format_report(_report(**{"chunklogits-triton": 100.0, "cce": 120.0, "liger": 90.0}))
    assert "### tiny: 4 x 3, V = 10, bf16, data zipf, GPU" in text
    assert "| chunklogits-triton | 100.00 | 3.0 | 1.040 | 2.50000 | ok |" in text
    assert "| naive-compiled | skipped: needs a CUDA GPU | | | | |" in text
    assert "- time <= cce: 100.00 vs 120.00 ms (ratio 0.833): met" in text
    assert "- time < liger: 100.00 vs 90.00 ms (ratio 1.111): NOT met" in text
    assert "- peak within 5% of the lower bound: 1.040: met" in text
    equal = gb.format_report(_report(**{"chunklogits-triton": 90.0, "liger": 90.0}))
    assert "- time < liger: 90.00 vs 90.00 ms (ratio 1.000): NOT met" in equal
    assert "- time vs cce: not measured (cce did not run)" in equal


def test_dry_run_on_cpu(tmp_path):
    """The whole script on a tiny shape: the Triton path (interpreted) meets the accuracy rule
    and its loss matches the naive one; implementations that need a GPU say so."""
    triton = pytest.importorskip("triton", reason="triton not installed (extra 'gpu')")
    if tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 9):
        pytest.skip(
            f"the dry run interprets the kernels: needs triton >= 3.9, has {triton.__version__}"
        )
    out = tmp_path / "bench.md"
    impls = ["chunklogits-triton", "naive", "torch-linear-cross-entropy", "liger"]
    command = [sys.executable, str(ROOT / "bench" / "gpu_benchmark.py"), "--dry-run",
               "--impls", *impls, "--repeats", "1", "--warmup", "0", "--out", str(out)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    text = out.read_text()
    assert "DRY RUN on CPU: not a measurement." in text
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in text.splitlines()
            if line.startswith("| ") and "---" not in line}  # fmt: skip
    ours, naive = rows["chunklogits-triton"], rows["naive"]
    assert ours[5].strip(" |") == "ok" and naive[5].strip(" |") == "ok"
    assert float(ours[4]) == pytest.approx(float(naive[4]), rel=1e-3)
    assert rows["liger"][1] == "skipped: needs a CUDA GPU"
