"""Weight-only quantised layers (ALLINONE_QUANTIZE int8 / int4) and batched replies, on the tiny model."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from worker.engine import Engine, cpu, int4pack, quant
from worker.engine.quant import (
    DEQUANT_ROWS,
    Int4Linear,
    Int8Linear,
    QuantEmbedding,
    packed_kernels_only,
    quantize_model,
)
from worker.settings import Settings
from worker.testing import smollm2_path

TEXTS = [
    "ok",
    "服务很好",
    "The hotel was great, the staff friendly and the room clean.",
    "房间太小，隔音很差，不推荐。" * 4,
    "Terrible service, the room was dirty and noisy. Never again. " * 6,
]
REPLY_ITEMS = [
    ([], "hello there"),
    ([("你好", "你好！")], "酒店位置很好，服务热情，房间干净"),
    ([], "The plot is thin and the jokes fall flat, two hours I will never get back."),
    ([], "ok"),
]



def engine_for(model_dir, tmp_path, **kw) -> Engine:
    s = dict(model=str(model_dir), dtype="float32", threads=1, do_sample=False, max_new_tokens=12, cache_dir=tmp_path)
    engine = Engine(Settings(**{**s, **kw}))
    engine.load()
    return engine


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
def test_a_quantised_layer_computes_its_dequantised_weights_linear(cls):
    # Given a Linear's weights quantised, in a float32 model
    torch.manual_seed(0)
    w, b = torch.randn(48, 128), torch.randn(48)
    q = cls.from_weight(w, b, torch.float32)
    assert (q.in_features, q.out_features) == (128, 48)
    w_hat = q.weight_rows(list(range(48)))
    # Then a call of many rows computes x @ W'.T + b for its own dequantised W' (the rows it reports), in float32
    many = torch.randn(2, DEQUANT_ROWS, 128)
    torch.testing.assert_close(q(many), many @ w_hat.T + b, atol=1e-4, rtol=1e-5)
    # and a call of few rows (the packed kernel) the same for its input rounded to bf16, the kernel's dtype, up to
    # the bf16 rounding of its output (2^-8 relative)
    few = torch.randn(2, 3, 128)
    expect = few.bfloat16().float() @ w_hat.T
    assert q(few).dtype == torch.float32
    torch.testing.assert_close(q(few), expect + b, atol=expect.abs().max().item() * 2**-8, rtol=0)
    # as does every call inside packed_kernels_only()
    with packed_kernels_only():
        expect = many.bfloat16().float() @ w_hat.T
        torch.testing.assert_close(q(many), expect + b, atol=expect.abs().max().item() * 2**-8, rtol=0)
    # and W' is W rounded: at most half a step off (int8: 1/254 of the row's largest weight; int4: 1/30 of the
    # group's range; the scales are bf16, a relative 2^-9 more)
    step = w.abs().amax(1, keepdim=True) / 127 if cls is Int8Linear else (w.amax(1) - w.amin(1))[:, None] / 15
    assert bool(((w_hat - w).abs() <= step / 2 + w.abs() * 2**-8 + 1e-5).all())


def test_unpack_int4_reads_the_kernels_packing_back(tmp_path):
    # torch packs in blocks of 64 rows under AVX-512, 32 under AVX2 and in pairs in the scalar build: each layout,
    # as far as this CPU can run it (ATEN_CPU_CAPABILITY only lowers it), full blocks and a partial one, whole
    # (unpack_int4) and row by row in any order (int4_rows, an embedding lookup)
    code = (
        "import torch\n"
        "from worker.engine.int4pack import int4_rows, unpack_int4, int4_layout_ok\n"
        "g = torch.Generator().manual_seed(0)\n"
        "for n, k in [(64, 32), (80, 64), (16, 32), (4864, 96), (208, 128)]:\n"
        "    q = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=g)\n"
        "    p = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)\n"
        "    assert torch.equal(unpack_int4(p, n, k).T.to(torch.int32), q), (n, k)\n"
        "    rows = torch.cat([torch.randperm(n, generator=g), torch.tensor([n - 1, 0, n - 1])])\n"
        "    assert torch.equal(int4_rows(p, n, k, rows).to(torch.int32), q[rows]), (n, k)\n"
        "assert int4_layout_ok()\n"
        "print(torch.backends.cpu.get_cpu_capability())\n"
    )
    seen = set()
    for capability in ("default", "avx2", "avx512"):
        env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        seen.add(out.stdout.strip())
    assert "DEFAULT" in seen


def test_an_int4_layer_reads_back_rows_through_the_kernel_when_the_layout_is_unknown(monkeypatch):
    torch.manual_seed(1)
    q = Int4Linear.from_weight(torch.randn(128, 96), None, torch.float32)
    rows = [0, 17, 63, 64, 127]
    unpacked = q.weight_rows(rows)
    # A torch whose packing this code does not know: rows come back through the kernel (the identity, a chunk of
    # 32 at a time), the same numbers up to the kernel's bf16 output; and calls of many rows stay on the kernel
    monkeypatch.setitem(int4pack._layout_checked, torch.backends.cpu.get_cpu_capability(), False)
    torch.testing.assert_close(q.weight_rows(rows), unpacked, rtol=2**-8, atol=1e-6)
    x = torch.randn(DEQUANT_ROWS, 96)
    with packed_kernels_only():
        on_kernel = q(x)
    assert torch.equal(q(x), on_kernel)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_each_quantised_mode_loads_classifies_and_replies(tiny_model_dir, tmp_path, mode):
    # Given the tiny model loaded in float32 and in a quantised mode
    ref = engine_for(tiny_model_dir, tmp_path, quantize="none")
    engine = engine_for(tiny_model_dir, tmp_path, quantize=mode)
    # Then every Linear (the tied LM head too) is quantised in the mode, the embedding reads the head's rows (the
    # model is tied), and the identity is the float model's
    assert engine.report is not None and engine.report.quantize == mode
    assert not any(isinstance(m, (torch.nn.Linear, torch.nn.Embedding)) for m in engine.model.modules())
    emb, head = engine.model.get_input_embeddings(), engine.model.get_output_embeddings()
    kind = Int4Linear if mode == "int4" else Int8Linear
    assert isinstance(head, kind)
    body = [m for n, m in engine.model.named_modules() if n.startswith("model.layers.")]
    assert any(isinstance(m, Int4Linear) for m in body) == (mode == "int4")
    assert isinstance(emb, QuantEmbedding) and emb.tied_to is head
    # An int4 head keeps the two label rows as the float model has them: sentiment reads those
    labels = list(engine.sentiment.label_ids)
    float_rows = ref.model.get_output_embeddings().weight[labels].float()
    if mode == "int4":
        assert head.kept_ids.tolist() == labels and torch.equal(engine.sentiment.label_weights, float_rows)
        assert not torch.equal(head.rows(torch.tensor(labels), torch.float32), float_rows)
    assert engine.report.weights_bytes < ref.report.weights_bytes / 2
    assert engine.identity == ref.identity
    # and it classifies: P(positive) close to float32's. Bound: each weight moves by at most half a quantisation
    # step (int8 0.4 % of a row's largest weight, int4 3 % of a group's range); through two layers and the label
    # rows that moves these logits by a few 1e-3 (int8) and 1e-2 (int4); P moves by at most a quarter of the
    # logit gap's change. Measured: 4e-4 and 3e-3; the bounds leave room for other seeds, not for a broken layer
    # (a wrong scale or group layout moves P by tenths).
    p = engine.score(TEXTS).p_positive
    torch.testing.assert_close(p, ref.score(TEXTS).p_positive, atol=0.01 if mode == "int8" else 0.05, rtol=0)
    assert [s.label for s in engine.classify(TEXTS)] == [s.label for s in engine.sentiments(engine.score(TEXTS))]
    # Weights only: the activations are not rescaled per pass, so the cached, batched path equals the plain pass
    plain = torch.cat([engine.score_plain(t).p_positive for t in TEXTS])
    torch.testing.assert_close(p, plain, atol=1e-4, rtol=1e-4)
    # and it replies
    reply = engine.reply([], "hello")
    assert reply.new_tokens == 12 or (reply.new_tokens and not reply.timed_out)


def test_the_int8_embedding_looks_up_its_rounded_rows_and_a_tied_one_reads_the_head():
    torch.manual_seed(0)
    table, ids = torch.randn(40, 16), torch.tensor([[0, 5, 39], [7, 7, 1]])
    emb = QuantEmbedding.from_weight(table, torch.float32)
    # Each row is within half a step (1/254 of its largest value) of the float row, plus its bf16 scale's rounding
    # (2^-9 relative), and the lookup returns them
    rows = emb.weight_rows(list(range(40)))
    assert bool(((rows - table).abs() <= table.abs().amax(1, keepdim=True) / 254 + table.abs() * 2**-8 + 1e-6).all())
    torch.testing.assert_close(emb(ids), rows[ids])
    # A table tied to an int8 head quantised from it reads the same numbers and holds no tensor of its own
    head = Int8Linear.from_weight(table, None, torch.float32)
    tied = QuantEmbedding.tied(head)
    assert list(tied.buffers()) == [] and torch.equal(tied(ids), emb(ids))


def test_an_int4_head_gives_its_rows_as_its_kernel_computes_them_and_a_tied_embedding_reads_them():
    torch.manual_seed(2)
    table, ids = torch.randn(208, 64), torch.tensor([[0, 63, 64, 207], [191, 192, 5, 5]])
    head = Int4Linear.from_weight(table, None, torch.float32)
    # The rows are those the kernel multiplies by: the identity through the kernel reads them back (to its bf16
    # output; how close they are to the float rows is the layer test's)
    through_kernel = head(torch.eye(64)).T
    rows = head.weight_rows(list(range(208)))
    torch.testing.assert_close(rows, through_kernel, rtol=2**-8, atol=1e-6)
    # A tied embedding looks them up ([2, 4] ids -> [2, 4, 64]) in the activations' dtype, holding nothing itself
    tied = QuantEmbedding.tied(head)
    assert list(tied.buffers()) == [] and torch.equal(tied(ids), rows[ids])
    half = QuantEmbedding.tied(Int4Linear.from_weight(table, None, torch.bfloat16))
    assert half(ids).dtype == torch.bfloat16


def test_auto_is_int4_unless_a_dtype_is_named():
    assert Settings().resolved_quantize() == "int4"
    assert Settings(dtype="float32").resolved_quantize() == "none"
    assert Settings(dtype="float32", quantize="int4").resolved_quantize() == "int4"


def test_quantize_model_swaps_every_linear_for_a_linear_like_module():
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5))
    x = torch.randn(4, 64)
    before = model(x)
    assert quantize_model(model, "int4", torch.float32) == 2
    # the 5-row layer cannot be packed in int4 (the kernel wants rows by 16): it falls back to int8
    assert isinstance(model[0], Int4Linear) and isinstance(model[2], Int8Linear)
    assert model(x).shape == before.shape


@pytest.mark.parametrize("mode", ["none", "int8", "int4"])
def test_batched_greedy_replies_equal_single_replies(lively_model_dir, tmp_path, mode):
    # Given prompts of different lengths (left-padded into one batch)
    engine = engine_for(lively_model_dir, tmp_path, quantize=mode)
    r = engine.replier
    prompts = [r.prompt_ids(h, t, engine.settings)[0] for h, t in REPLY_ITEMS]
    single = [r.generate(p, engine.settings).tolist() for p in prompts]
    # (under int4 one row meets the stop token after two tokens: a row ending early, for free)
    assert len({tuple(s) for s in single}) == len(single) and sum(len(set(s)) > 3 for s in single) >= 3
    assert len(single[0]) >= 5
    # When they are decoded together, Then each row is its own single reply, token for token
    assert [b.tolist() for b in r.generate_batch(prompts, engine.settings)] == single
    # and a row that meets a stop token ends there while the others go on
    stop = single[0][4]
    r.stop_ids = [*r.stop_ids, stop]
    single = [r.generate(p, engine.settings).tolist() for p in prompts]
    assert single[0][-1] == stop and len(single[0]) <= 5 and max(len(s) for s in single) == 12
    assert [b.tolist() for b in r.generate_batch(prompts, engine.settings)] == single
    # and the engine's reply_batch gives the same texts as reply
    r.stop_ids = r.stop_ids[:-1]
    assert [x.text for x in engine.reply_batch(REPLY_ITEMS)] == [engine.reply(h, t).text for h, t in REPLY_ITEMS]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_gguf_loads_straight_into_quantised_layers_and_from_its_cache(tmp_path, mode):
    gguf = smollm2_path()
    if gguf is None:
        pytest.skip("SmolLM2 GGUF not available")
    ref = Engine(Settings(model=str(gguf), dtype="float32", quantize="none", threads=2, cache_dir=tmp_path))
    ref.load()
    cold = Engine(Settings(model=str(gguf), dtype="float32", quantize=mode, threads=2, cache_dir=tmp_path))
    assert cold.load().from_cache is False
    warm = Engine(Settings(model=str(gguf), dtype="float32", quantize=mode, threads=2, cache_dir=tmp_path))
    assert warm.load().from_cache is True
    p_ref, p_cold, p_warm = (e.score(TEXTS).p_positive for e in (ref, cold, warm))
    torch.testing.assert_close(p_cold, p_warm, atol=0, rtol=0)
    # A real model's P(positive) moves by a few hundredths under int8 weights (0.033 at most on these texts, with
    # SmolLM2), more under int4; a broken layer (wrong scales, a wrong q/k permutation) moves it by tenths.
    torch.testing.assert_close(p_cold, p_ref, atol=0.06 if mode == "int8" else 0.15, rtol=0)
    assert cold.identity == ref.identity


def test_reply_log_likelihood_is_a_mean_over_reply_tokens_and_moves_little_under_int8(tiny_model_dir, tmp_path):
    from worker.tools.reply_likelihood import reply_log_likelihood

    pairs = (("hello", "hello there"), ("服务很好", "谢谢"))
    ref = reply_log_likelihood(engine_for(tiny_model_dir, tmp_path, quantize="none"), pairs)
    q8 = reply_log_likelihood(engine_for(tiny_model_dir, tmp_path, quantize="int8"), pairs)
    assert len(ref["per_reply"]) == 2 and ref["mean_log_likelihood_per_token"] < 0
    assert abs(ref["perplexity"] - 2.718281828 ** -ref["mean_log_likelihood_per_token"]) < 1e-3 * ref["perplexity"]
    assert abs(q8["mean_log_likelihood_per_token"] - ref["mean_log_likelihood_per_token"]) < 0.01


def test_the_quantised_cache_is_read_back_equal_and_aligned(tmp_path):
    from safetensors.torch import save_file

    from worker.engine.gguf import read_aligned

    # Given tensors of odd byte sizes, so that in the file most of them start off a 64-byte boundary
    state = {"a": torch.arange(3, dtype=torch.int8), "b": torch.randn(5, 7).to(torch.bfloat16),
             "c": torch.randint(0, 255, (33,), dtype=torch.uint8), "d": torch.randn(4, 4)}
    save_file(state, str(tmp_path / "w.safetensors"), metadata={"fingerprint": "abc"})
    # When read back, Then every tensor is equal and in torch's own aligned memory (the int8 kernel needs it)
    back, metadata = read_aligned(tmp_path / "w.safetensors")
    assert back.keys() == state.keys() and metadata == {"fingerprint": "abc"}
    for k, t in state.items():
        assert torch.equal(back[k], t) and back[k].dtype == t.dtype and back[k].data_ptr() % 64 == 0


def test_every_engine_call_gives_its_freed_memory_back_after_it(tiny_model_dir, tmp_path, monkeypatch):
    engine = engine_for(tiny_model_dir, tmp_path)
    calls: list[str] = []
    monkeypatch.setattr(cpu, "give_back_freed_memory", lambda: calls.append("trim"))
    engine.classify(TEXTS[:3])
    engine.score_plain(TEXTS[0])
    engine.reply([], "hello")
    engine.reply_batch([([], "hello"), ([], "good day")])
    assert calls == ["trim"] * 4
    with pytest.raises(ValueError):  # a call that fails gives its memory back too
        engine.score(TEXTS[:1], layers=(99,))
    assert len(calls) == 5


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_a_calls_buffers_are_reused_from_the_heap_and_given_back_after_it():
    # Under the engine's policy a forward pass's freed buffers (here 12 MiB, over glibc's default threshold) are
    # reused by the next layer instead of being mapped, faulted in and zeroed again; after the call the engine
    # gives them back, so the resident memory returns to what it was. Without the policy glibc maps the first
    # buffers (page faults every time) until its moving threshold catches up.
    code = """
import resource, sys
from worker.engine import cpu
if sys.argv[1] == "policy":
    cpu.reuse_freed_memory()
import torch
def rss():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS")) << 10
base = rss()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):  # ten "layers", each with three live activations of 12 MiB
    a, b, c = (torch.empty(12 << 20, dtype=torch.uint8).fill_(1) for _ in range(3))
    del a, b, c
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
held = rss() - base
cpu.give_back_freed_memory()
print(faults, held, rss() - base)
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "THP_MEM_ALLOC", "LD_PRELOAD"))}

    def run(mode: str) -> tuple[int, int, int]:
        out = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, env=env,
                             check=True).stdout
        faults, held, after = (int(v) for v in out.split()[-3:])
        return faults, held, after

    faults, held, after = run("policy")
    default_faults, _, _ = run("default")
    one_layer = 3 * (12 << 20) // 4096
    assert faults < 2 * one_layer  # the first layer's buffers faulted in once, then reused
    assert default_faults > faults
    assert held >= 30 << 20  # the heap held the layers' buffers until the call ended...
    assert after < 8 << 20  # ...and gave them back after it


def _thp_mode() -> str:
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return "missing"
    return text.split("[", 1)[1].split("]", 1)[0] if "[" in text else "missing"


@pytest.mark.skipif(_thp_mode() not in ("always", "madvise"), reason="the kernel's transparent huge pages are off")
def test_large_buffers_are_backed_by_huge_pages_once_the_engine_asks_unless_the_user_said_no():
    import os
    import subprocess
    import sys

    code = """
from worker.engine import cpu
cpu.huge_pages()
import torch
x = torch.empty(64 << 20, dtype=torch.uint8).fill_(1)
print(next(int(line.split()[1]) for line in open("/proc/self/smaps_rollup") if line.startswith("AnonHugePages")))
"""
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}

    def huge_kib(extra: dict[str, str]) -> int:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**env, **extra},
                             check=True).stdout
        return int(out.split()[-1])

    # In "always" mode the kernel may back a buffer with huge pages without being asked; in "madvise" it must not.
    assert huge_kib({}) >= 2048
    if _thp_mode() == "madvise":
        assert huge_kib({"THP_MEM_ALLOC_ENABLE": "0"}) == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_a_training_process_reuses_its_freed_buffers_instead_of_faulting_them_in_every_step():
    # Ten "steps" of a 64 MiB buffer (over glibc's largest mmap threshold) after two first ones: the worker's
    # policy maps, faults in and zeroes it every time; kept in the heap, the first steps' memory is reused.
    code = """
import resource, sys
from worker.engine import cpu
cpu.reuse_freed_memory()
if sys.argv[1] == "keep":
    cpu.keep_freed_memory()
import torch
for _ in range(2):
    torch.empty(64 << 20, dtype=torch.uint8).fill_(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.empty(64 << 20, dtype=torch.uint8).fill_(1)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "THP_MEM_ALLOC", "LD_PRELOAD"))}

    def faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, env=env,
                             check=True).stdout
        return int(out.split()[-1])

    kept, released = faults("keep"), faults("release")
    assert released >= 10 * (64 << 20) // (2 << 20)  # every step faulted its buffer in again (even in huge pages)
    assert kept * 4 < released  # glibc may place a block anew now and then; measured: 1 step in 10, or none


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_batches_of_many_rows_score_through_dequantised_weights_and_decode_steps_stay_on_the_kernels(
        lively_model_dir, tmp_path, monkeypatch, mode):
    engine = engine_for(lively_model_dir, tmp_path, quantize=mode, prompt_cache_mb=0)
    on_kernels = engine.score(TEXTS)
    # When every call of 2 rows or more dequantises (the tiny model's batches are far below the real threshold)
    monkeypatch.setattr(quant, "DEQUANT_ROWS", 2)
    calls = []
    monkeypatch.setattr(quant.Int8Linear, "dequantized", _counting(quant.Int8Linear.dequantized, calls))
    monkeypatch.setattr(quant.Int4Linear, "dequantized", _counting(quant.Int4Linear.dequantized, calls))
    dequantised = engine.score(TEXTS)
    # Then sentiment went through the dequantised weights and scores what the kernels score: the two differ by the
    # bf16 rounding of the kernel's input and output only (the tiny model runs in float32), a few 1e-4 in P
    assert calls
    torch.testing.assert_close(dequantised.p_positive, on_kernels.p_positive, atol=5e-3, rtol=0)
    assert [s.label for s in engine.sentiments(dequantised)] == [s.label for s in engine.sentiments(on_kernels)]
    # and a reply's prompt, computed alone, may dequantise too, but its decode steps never do (a row's numbers
    # must not depend on how many rows decode with it): batched greedy replies still equal single ones
    calls.clear()
    r = engine.replier
    prompts = [r.prompt_ids(h, t, engine.settings)[0] for h, t in REPLY_ITEMS]
    single = [r.generate(p, engine.settings).tolist() for p in prompts]
    assert calls
    assert [b.tolist() for b in r.generate_batch(prompts, engine.settings)] == single


def _counting(fn, calls):
    def wrapped(self, *a, **kw):
        calls.append(type(self).__name__)
        return fn(self, *a, **kw)
    return wrapped


def test_the_dequantisation_threshold_is_timed_at_load_or_taken_from_the_settings(tiny_model_dir, tmp_path,
                                                                                   monkeypatch):
    monkeypatch.setattr(quant, "DEQUANT_ROWS", quant.DEQUANT_ROWS_DEFAULT)  # restored after the test
    # Given a pinned threshold, the engine uses it and reports it
    engine = engine_for(tiny_model_dir, tmp_path, quantize="int4", dequant_rows=40)
    assert engine.report.dequant_rows == quant.DEQUANT_ROWS == 40
    # When the packed kernel is made slower than any dequantised GEMM, the timing picks the fewest candidate rows
    kernel = quant.Int4Linear.forward

    def slow_kernel(self, x):
        import time
        time.sleep(0.002)
        return kernel(self, x)

    monkeypatch.setattr(quant.Int4Linear, "forward", slow_kernel)
    assert cpu.calibrate_dequant_rows(engine.model) == quant.DEQUANT_ROWS == cpu.DEQUANT_CANDIDATES[0]
    # and when dequantising is made the slower path, the threshold falls back to the default
    monkeypatch.setattr(quant.Int4Linear, "forward", kernel)
    dequantized = quant.Int4Linear.dequantized

    def slow_dequantized(self, dtype):
        import time
        time.sleep(0.002)
        return dequantized(self, dtype)

    monkeypatch.setattr(quant.Int4Linear, "dequantized", slow_dequantized)
    assert cpu.calibrate_dequant_rows(engine.model) == quant.DEQUANT_ROWS == quant.DEQUANT_ROWS_DEFAULT
    # A model without quantised layers reports none
    assert engine_for(tiny_model_dir, tmp_path, quantize="none", dequant_rows=0).report.dequant_rows is None
