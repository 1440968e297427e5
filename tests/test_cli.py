"""The main job (``python -m chunklogits``) on tiny models: the numbers in its table are the ones
computed independently here (reference loss, log-probs, next token), its files exist and parse,
and bad flags or models are refused with a message naming them. No timing is asserted."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig

from chunklogits import benchmark, cli, reference
from chunklogits.benchmark import TASKS, Workload
from tests.helpers import one_thread, tiny_llama_config

pytestmark = pytest.mark.usefixtures(one_thread.__name__)

ROOT = Path(__file__).resolve().parents[1]


def tiny_llama(vocab: int = 300, layers: int = 2) -> LlamaConfig:
    return tiny_llama_config(vocab, layers)


def seeded_tokens(vocab: int, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny fp32 Llama saved with save_pretrained, as a user's local checkpoint."""
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(tiny_llama(), dtype=torch.float32)
    directory = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def job(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    argv = ["--model", str(checkpoint), "--dtype", "float32", "--sizes", "8,16"]
    argv += ["--batches", "2,3", "--out", str(out)]
    assert cli.main(argv) == 0
    header, results = json.loads((out / "results.json").read_text()).values()
    return out, header, results


def _rows(results, task, case=None):
    return [r for r in results if r["task"] == task and (case is None or r["case"] == case)]


def test_table_values_equal_independent_computations(checkpoint, job):
    _, header, results = job
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    weight = model.lm_head.weight
    assert header["vocab x hidden"] == "300 x 32"
    for size in (8, 16):
        ids = seeded_tokens(300, 1, size)
        with torch.no_grad():
            hidden = model.model(ids).last_hidden_state
            next_token = model(ids).logits[0, -1].argmax().item()
            loss = reference.linear_cross_entropy(hidden, weight, ids, shift=True).item()
            logprobs = reference.token_logprobs(hidden[:, :-1], weight, ids[:, 1:])
        for task, expected in (("prefill", next_token), ("loss", loss)):
            rows = [r for r in _rows(results, task) if r["size"] == size]
            assert len(rows) == len(TASKS[task].cases)
            for row in rows:
                assert row["value"] == pytest.approx(expected, abs=1e-5), row
        for row in (r for r in _rows(results, "logprobs") if r["size"] == size):
            assert row["value"] == pytest.approx(logprobs.mean().item(), abs=1e-5), row
        ours = next(r for r in _rows(results, "loss", "chunklogits") if r["size"] == size)
        assert ours["max_diff"] <= 1e-5


def test_markdown_table_matches_the_json(job):
    out, _, results = job
    text = (out / "report.md").read_text()
    for task in TASKS.values():
        assert f"## {task.title}" in text
        assert f"![{task.name}]({task.name}.png)" in text
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| ")]
    table = [[cell.strip() for cell in row] for row in rows if row[0].strip() != "implementation"]
    assert len(table) == len(results)
    for cells, r in zip(table, results, strict=True):
        assert cells[0] == r["case"] and int(cells[1]) == r["size"]
        assert float(cells[2]) == pytest.approx(r["peak_bytes"] / 2**20, abs=0.05)
        assert float(cells[4]) == pytest.approx(r["seconds"], abs=0.005)
        ours = [o for o in _rows(results, r["task"], "chunklogits") if o["size"] == r["size"]]
        if ours and ours[0]["peak_bytes"]:
            ratio = r["peak_bytes"] / ours[0]["peak_bytes"]
            assert float(cells[3]) == pytest.approx(ratio, abs=0.0051)  # printed with 2 decimals
        else:
            assert cells[3] == "—"


def test_figures_are_png_images(job):
    import matplotlib.image

    out, _, _ = job
    for task in TASKS:
        image = matplotlib.image.imread(out / f"{task}.png")
        assert image.ndim == 3 and image.shape[0] >= 300 and image.shape[1] >= 1000


def test_module_entry_point_runs_offline_from_a_config_json(tmp_path):
    tiny_llama().save_pretrained(tmp_path)  # writes config.json only: random weights
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    argv = ["--model", str(tmp_path / "config.json"), "--layers", "1", "--tasks", "loss"]
    argv += ["--sizes", "12", "--dtype", "float32", "--out", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "chunklogits", "bench", *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    header, results = json.loads((out / "results.json").read_text()).values()
    assert header["model"] == str(tmp_path / "config.json")
    # The same seed builds the same random model in this process.
    model = benchmark.build_model(path=tmp_path / "config.json", layers=1, dtype=torch.float32)
    assert model.config.num_hidden_layers == 1
    ids = seeded_tokens(300, 1, 12)
    with torch.no_grad():
        hidden = model.model(ids).last_hidden_state
        expected = reference.linear_cross_entropy(hidden, model.lm_head.weight, ids, shift=True)
    assert [r["case"] for r in results] == [c.name for c in TASKS["loss"].cases]
    for row in results:
        assert row["value"] == pytest.approx(expected.item(), abs=1e-5)
    assert re.search(r"\| chunklogits \| 12 \| [0-9.]+ \| 1\.00 \|", done.stdout)


def test_progress_steps_are_counted_exactly(checkpoint):
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    calls = []
    benchmark.run_task(Workload(model), TASKS["loss"], (8, 16), on_step=calls.append)
    assert len(calls) == benchmark.count_steps([TASKS["loss"]], (8, 16), ()) == 9
    assert calls[0] == "loss: transformers 4.40 (fp32 logits + shifted copy) (warm-up)"


def test_cases_that_would_not_fit_are_skipped_with_the_estimate(monkeypatch):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama(vocab=4096), dtype=torch.float32).eval()
    checks = []  # each case checks twice: room at its first size, none at its second

    def available(device):
        checks.append(device)
        return 2**50 if len(checks) % 2 else 0

    monkeypatch.setattr(benchmark, "available_bytes", available)
    results = benchmark.run_task(Workload(model), TASKS["prefill"], (256, 512, 1024))
    assert len(checks) == 2 * len(TASKS["prefill"].cases)
    for case in TASKS["prefill"].cases:
        first, second, third = (r for r in results if r.case == case.name)
        assert first.peak_bytes > 0 and first.skipped is None
        found = re.fullmatch(
            r"not run: needs about ([0-9,]+) MiB \(extrapolated from 256\), 0 MiB available",
            second.skipped,
        )
        assert found and int(found[1].replace(",", "")) >= round(first.peak_bytes / 2**20)
        assert second.peak_bytes is None and third.skipped == second.skipped


def test_trl_baselines_equal_the_textbook_expressions():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 50, generator=g, dtype=torch.float64) * 4
    index = torch.randint(0, 50, (3, 7), generator=g)
    logp = logits.log_softmax(-1)
    picked = benchmark.selective_log_softmax(logits, index)
    torch.testing.assert_close(picked, logp.gather(-1, index[..., None]).squeeze(-1))
    entropy = benchmark.entropy_from_logits(logits, chunk_size=4)
    torch.testing.assert_close(entropy, -(logp.exp() * logp).sum(-1))


def test_a_declared_logit_transform_is_applied_in_every_case():
    config = Gemma2Config(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        final_logit_softcapping=0.5,  # small enough to change random logits a lot
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    workload = Workload(model)
    workload.check_head()
    assert workload.transform == {"softcap": 0.5, "logit_scale": None}
    ids = seeded_tokens(300, 1, 10)
    with torch.no_grad():
        logits = model(ids).logits.float()
        loss = model(ids, labels=ids).loss.item()
    logp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).mean().item()
    next_token = logits[0, -1].argmax().item()
    for task, expected in (("loss", loss), ("logprobs", logp), ("prefill", next_token)):
        for result in benchmark.run_task(workload, TASKS[task], (10,)):
            assert result.value == pytest.approx(expected, abs=1e-5), result


def test_an_undeclared_logit_transform_is_refused():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama(), dtype=torch.float32).eval()
    model.lm_head.register_forward_hook(lambda module, inputs, output: 2 * output)
    refused = r"model: chunklogits bench refuses LlamaForCausalLM, .* unknown logit transform"
    with pytest.raises(ValueError, match=refused):
        Workload(model).check_head()


def test_a_head_fed_other_than_the_decoders_hidden_states_is_refused():
    from tests.test_generate import _bert_decoder

    model = _bert_decoder()  # dense -> GELU -> LayerNorm between its decoder and output layer
    refused = r"chunklogits bench refuses BertLMHeadModel, .* not fed BertModel's last hidden"
    with pytest.raises(ValueError, match=refused):
        Workload(model).check_head()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "/nonexistent/dir"], "model: expected a checkpoint directory or config.json"),
        (["--sizes", "1,8"], "--sizes: expected integers >= 2, got '1,8'"),
        (["--sizes", "8,x"], "--sizes: expected comma-separated integers, got '8,x'"),
        (["--tasks", "loss,nope"], "--tasks: expected names from"),
        (["--shards", "0"], "--shards: expected an integer >= 1, got '0'"),
        (["--batch", "-2"], "--batch: expected an integer >= 1, got '-2'"),
        (["--batches", "0,4"], "--batches: expected integers >= 1, got '0,4'"),
        (["--minutes", "0"], "--minutes: expected a number of minutes > 0, got '0'"),
        (["--minutes", "nan"], "--minutes: expected a number of minutes > 0, got 'nan'"),
    ],
)
def test_bad_flags_are_refused_naming_the_flag(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_checkpoint_keeps_its_layers(checkpoint):
    with pytest.raises(ValueError, match="layers: a checkpoint keeps its own layers"):
        benchmark.build_model(path=checkpoint, layers=1)


def test_seed_headline_ratios_are_peaks_over_ours():
    from bench.seed_figures import HEADLINE_TOKENS, headline

    peaks = {"transformers 4.40 (fp32 logits)": 9 * 2**30, "chunklogits": 3 * 2**29}
    results = [
        benchmark.Result("prefill", case, size, seconds=1.0, peak_bytes=peak)
        for case, peak in peaks.items()
        for size in (HEADLINE_TOKENS - 500, HEADLINE_TOKENS)
    ]
    runs = [{"shape": "llama3-8b", "task": "prefill", "results": [vars(r) for r in results]}]
    lines = headline(runs, "prefill")
    assert lines[2] == "| transformers 4.40 (fp32 logits) | 9.00 | 6.00 |"
    assert lines[3] == "| chunklogits | 1.50 | 1.00 |"
    assert len(lines) == 4


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "build_model: expected exactly one of preset and path"),
        ({"preset": "llama3-1b", "path": "x"}, "build_model: expected exactly one of preset"),
        ({"preset": "llama3-70b"}, "preset: expected one of ['gemma-7b', 'llama3-1b', "),
        ({"preset": "llama3-1b", "layers": 0}, "layers: expected an int >= 1, got 0"),
        ({"path": "/nonexistent"}, "model: expected a checkpoint directory or config.json"),
    ],
)
def test_build_model_refuses_bad_arguments(kwargs, message):
    with pytest.raises(ValueError) as error:
        benchmark.build_model(**kwargs)
    assert message in str(error.value)


def test_a_directory_without_config_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"model: expected .*config\.json to exist"):
        benchmark.build_model(path=tmp_path)


def test_a_model_without_output_layer_is_refused():
    from transformers import LlamaModel

    with pytest.raises(ValueError, match="model: expected a causal LM with an output layer"):
        Workload(LlamaModel(tiny_llama()))


def test_predicted_peak_is_affine_in_the_size():
    mib = 2**20
    # The line through the last two measurements: a fixed part (gradients) and a growing one.
    assert benchmark.predicted_peak([(1000, 3000 * mib), (2000, 4000 * mib)], 4000) == 6000 * mib
    assert benchmark.predicted_peak([(16, 2416 * mib), (100, 2500 * mib)], 1000) == 3400 * mib
    # A shrinking peak does not predict less than what was measured.
    assert benchmark.predicted_peak([(100, 60 * mib), (200, 50 * mib)], 400) == 50 * mib


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtype_follows_the_instruction_set(monkeypatch, native):
    monkeypatch.setattr(cli, "_cpu_multiplies_natively", lambda dtype: native)
    dtype, why = cli.choose_dtype("auto", "cpu")
    assert dtype == ("bfloat16" if native else "float32")
    assert ("natively" in why) if native else ("no native bf16 GEMM" in why)
    assert cli.choose_dtype("auto", "cuda") == ("bfloat16", "auto: bf16 is the fast path on cuda")
    assert cli.choose_dtype("float16", "cpu") == ("float16", "as requested")


def test_time_estimate_counts_the_gemm_flops_of_every_run(checkpoint):
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    w = Workload(model)
    vocab, dim = w.weight.shape
    decoder = sum(p.numel() for p in model.model.parameters()) - vocab * dim  # untied embedding
    layers = model.config.num_hidden_layers

    def flops(tokens, length, head_tokens, passes, head_gemms):
        # every case runs the decoder (3 loss cases, 2 sampling ones); head_gemms summed over them
        cases = 3 if passes == 3 else 2
        decoder_flops = 2 * tokens * (decoder + length * dim * layers) * passes * cases
        return decoder_flops + 2 * head_tokens * vocab * dim * head_gemms

    runs = (16, 16, 32, 8, 24)  # warm-up, the two anchors, then the sizes
    loss = sum(flops(2 * n, n, 2 * n, 3, 3 + 3 + 4) for n in runs)
    sampling = sum(flops(4 * n, 4, n, 1, 1 + 1) for n in (16, 16, 32, 5))
    seconds = benchmark.estimate_seconds(
        w, [TASKS["loss"], TASKS["sampling"]], (8, 24), (5,), batch=2, flops_per_second=1e9
    )
    assert seconds == pytest.approx(benchmark._OVERHEAD * (loss + sampling) / 1e9, rel=1e-12)


@pytest.mark.parametrize("default_seconds, expected", [(20, 1), (45, 2), (1e9, 8)])
def test_default_sizes_are_halved_until_the_estimate_fits(
    monkeypatch, checkpoint, default_seconds, expected
):
    # The GEMM rate is set so that the default sizes' estimate is default_seconds; half a minute
    # allowed: the defaults, the defaults halved once (about half of 45 s), the smallest candidate.
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    w, tasks = Workload(model), list(TASKS.values())
    args = cli.parser().parse_args(["--minutes", "0.5"])

    def seconds(sizes, rate):
        return benchmark.estimate_seconds(
            w, tasks, sizes, args.batches, batch=1, flops_per_second=rate
        )

    rate = seconds(cli.DEFAULT_SIZES, 1.0) / default_seconds
    monkeypatch.setattr(benchmark, "gemm_flops_per_second", lambda workload: rate)
    sizes, why = cli.choose_sizes(w, tasks, args)
    assert sizes == tuple(size // expected for size in cli.DEFAULT_SIZES)
    assert f"about {seconds(sizes, rate) / 60:.1f} min estimated" in why and "--minutes 0.5" in why
    if expected == 2:
        assert seconds(sizes, rate) <= 30 < seconds(cli.DEFAULT_SIZES, rate)
    assert cli.choose_sizes(w, tasks, cli.parser().parse_args(["--sizes", "9,10"]))[0] == (9, 10)
