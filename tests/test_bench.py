"""The benchmark end to end on the tiny model, and the equalities its speed-ups rest on.

Timings here are meaningless (a random 2-layer model, a busy machine): we assert that every number is produced and
positive, never how large it is. What must hold exactly is that the fast sentiment paths compute what the plain
forward pass computes.
"""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from worker.engine import Engine
from worker.settings import Settings, cpu_has_native_bf16
from worker.tools import bench, datasets

# Mixed languages and lengths: one token to past the token budget, so sorted batches still pad heavily.
MIXED = [
    "ok",
    "服务很好",
    "The hotel was great, the staff friendly and the room clean.",
    "房间太小，隔音很差，不推荐。" * 4,
    "Terrible service, the room was dirty and noisy. Never again. " * 12,
    "好",
    "Hello! How are you today?",
    "酒店位置很好，服务热情，房间干净，下次还会再来。" * 9,
    "!",
    "A warm, funny and beautifully acted film, " * 3,
]

KEYS = (
    "speedup_single_vs_naive",
    "speedup_bulk_vs_naive",
    "bulk_messages_per_second",
    "reply_tokens_per_second",
    "bandwidth_limit_tokens_per_second",
    "warm_load_seconds",
    "peak_rss_bytes",
    "weights_bytes",
    "threads",
    "reply_batch_size",
    "batched_reply_tokens_per_second",
    "messages_per_second_with_replies",
    "load_peak_rss_bytes",
)


@pytest.fixture(scope="module")
def bench_result(tiny_settings, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One benchmark run on the tiny model with --json (it starts two load subprocesses: run it once)."""
    f = tmp_path_factory.mktemp("bench") / "messages.jsonl"
    f.write_text("".join(json.dumps({"text": t, "label": "positive"}, ensure_ascii=False) + "\n" for t in MIXED))
    argv = ["--model", tiny_settings.model, "--dtype", "float32", "--threads", "1", "--messages", str(f)]
    argv += ["--n", "6", "--reply-tokens", "8", "--batch-size", "4", "--rounds", "1", "--json"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert bench.main(argv) == 0
    return dict(json.loads(out.getvalue()))


def test_bench_runs_end_to_end_and_reports_every_number(bench_result):
    # Given one run of the benchmark on the tiny model and a handful of mixed messages
    result = bench_result
    # Then every headline number is there and positive, with what it was measured on
    for key in KEYS:
        assert result[key] > 0, key
    assert result["messages"] == 6 and result["dtype"] == "float32" and result["cpu_model"]
    assert result["model_identity"]["fingerprint"]
    assert result["cold_load_seconds"] is None  # a model folder: nothing to convert
    # llama.cpp reads GGUF files only: no reference figures for a model folder
    assert result["reference_tokens_per_second"] is None and result["reference_peak_rss_bytes"] is None
    # and the fast path agreed with the plain forward pass on every measured message
    assert result["agreement"]["labels_fast_vs_plain"] == 1.0
    assert result["agreement"]["max_abs_logit_diff"] < 1e-3
    # and a conversation of the messages as turns read its earlier turns from the kept cache, not computing them
    turns = result["conversation_turns"]
    assert turns == 6 and len(result["conversation_first_token_seconds"]) == turns
    assert result["conversation_prompt_tokens"] == sorted(result["conversation_prompt_tokens"])  # history grows
    mean_prompt = sum(result["conversation_prompt_tokens"]) / turns
    assert result["conversation_prompt_tokens_computed_uncached"] == mean_prompt
    assert 0 < result["conversation_prompt_tokens_computed"] < mean_prompt / 2


def test_bench_table_names_the_machine_and_the_ratios(bench_result):
    table = bench.format_table(bench_result)
    assert bench_result["cpu_model"] in table and "x naive" in table
    assert "bandwidth-limit decode" in table and "peak RSS" in table
    assert "kept cache" in table


def test_messages_alternate_between_files(tmp_path):
    zh, en = tmp_path / "zh.jsonl", tmp_path / "en.jsonl"
    zh.write_text("".join(json.dumps({"text": f"中{i}"}) + "\n" for i in range(3)))
    en.write_text("".join(json.dumps({"text": f"en{i}"}) + "\n" for i in range(3)))
    assert bench.load_messages([zh, en], 5) == ["中0", "en0", "中1", "en1", "中2"]
    assert bench.load_messages([tmp_path / "missing.jsonl"], 3) == list(bench.FALLBACK_MESSAGES[:3])


def test_default_messages_are_the_shipped_dev_sets_alternated():
    # Given no --messages: the zh and en dev sets shipped with the product, wherever the project is
    zh, en = (datasets.read_examples(datasets.shipped(lang, "dev")) for lang in ("zh", "en"))
    # Then the benchmark measures them in turn, zh first
    assert bench.load_messages(bench.default_message_files(), 4) == [zh[0].text, en[0].text, zh[1].text, en[1].text]


@pytest.mark.parametrize("batch_size", [1, 3, 4, 16])
def test_cached_and_batched_scores_equal_the_plain_forward_pass(tiny_engine, batch_size):
    # Given mixed-length zh/en texts, so every batch but the last pads some rows by tens of tokens
    fast = tiny_engine.score(MIXED, batch_size=batch_size)
    # Then each message's score is the one the uncached, unbatched full forward pass gives
    for i, text in enumerate(MIXED):
        plain = tiny_engine.score_plain(text)
        torch.testing.assert_close(fast.label_logits[i], plain.label_logits[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(fast.hidden[i], plain.hidden[0], atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not (torch.backends.mkldnn.is_available() and cpu_has_native_bf16()),
                    reason="oneDNN packs bf16 weights only on a CPU with AVX512-BF16 or AMX (load() checks the same)")
def test_packed_bf16_linear_computes_what_linear_computes():
    from worker.engine import PackedLinear

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96).to(torch.bfloat16)
    packed = PackedLinear(linear)
    for shape in [(1, 1, 64), (3, 17, 64)]:  # a decode step and a padded batch
        x = torch.randn(shape, dtype=torch.bfloat16)
        with torch.inference_mode():
            torch.testing.assert_close(packed(x), linear(x), atol=0.05, rtol=0.02)
    assert packed.weight is linear.weight  # tied embeddings and the label rows still find it


@pytest.mark.skipif(not (torch.backends.mkldnn.is_available() and cpu_has_native_bf16()),
                    reason="oneDNN packs bf16 weights only on a CPU with AVX512-BF16 or AMX (load() checks the same)")
def test_packed_bf16_model_keeps_fast_and_plain_scores_together(tiny_model_dir, tmp_path):
    from worker.engine import pack_bf16_linears

    # Given the tiny model in bf16 with every Linear packed (what load() does on a CPU with native bf16)
    engine = Engine(Settings(model=str(tiny_model_dir), dtype="bfloat16", threads=1, cache_dir=tmp_path))
    engine.load()
    pack_bf16_linears(engine.model)  # a no-op where load() already packed
    assert not any(type(m) is torch.nn.Linear for m in engine.model.modules())
    # Then the cached, batched scores still match the plain pass to bf16 precision, labels included
    fast = engine.score(MIXED, batch_size=4)
    plain = torch.cat([engine.score_plain(t).label_logits for t in MIXED])
    torch.testing.assert_close(fast.label_logits, plain, atol=0.05, rtol=0.02)
    assert engine.reply([], "hello").new_tokens > 0


def test_a_reference_child_that_crashes_is_named_by_its_signal_and_leaves_its_figures_null(capsys):
    """llama.cpp crashing inside its own kernels (ggml's AMX path faulted on one machine) must not pass for a
    hang or an empty answer: the bench says which signal stopped it and reports no reference figures."""
    import signal
    import subprocess
    import sys
    import tempfile

    from worker.tools import bench_reference

    ref = bench_reference.Reference.__new__(bench_reference.Reference)
    ref.timeout, ref.rounds = 60, []
    ref.stderr = tempfile.TemporaryFile(mode="w+")
    crash = "import os, signal, sys; sys.stdin.readline(); os.kill(os.getpid(), signal.SIGSEGV)"
    ref.proc = subprocess.Popen([sys.executable, "-c", crash], text=True, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=ref.stderr)
    assert ref.round() is None
    assert f"killed by {signal.SIGSEGV.name}" in capsys.readouterr().err
    assert ref.finish() == dict.fromkeys(bench_reference.KEYS)
