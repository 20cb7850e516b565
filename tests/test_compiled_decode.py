"""The reply's decode step through torch.compile (ALLINONE_COMPILE_DECODE), on the tiny model."""

from __future__ import annotations

import inspect
import logging

import pytest
import torch

from worker.engine import Engine, compiled_decode
from worker.settings import Settings

REPLY_ITEMS = [
    ([], "hello there"),
    ([("你好", "你好！")], "酒店位置很好，服务热情，房间干净"),
    ([], "The plot is thin and the jokes fall flat, two hours I will never get back."),
]



def engine_for(model_dir, cache_dir, **kw) -> Engine:
    s = dict(model=str(model_dir), dtype="float32", threads=1, do_sample=False, max_new_tokens=12,
             cache_dir=cache_dir)
    engine = Engine(Settings(**{**s, **kw}))
    engine.load()
    return engine


def test_only_one_token_inference_steps_go_to_the_compiled_forward(monkeypatch):
    # Given a forward whose compiled form is recorded instead of compiled
    calls: list[str] = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: lambda *a, **k: calls.append("compiled"))
    step = compiled_decode.DecodeStep(lambda *a, **k: calls.append("eager"))
    one, prompt = torch.zeros(2, 1, dtype=torch.long), torch.zeros(1, 7, dtype=torch.long)
    # Then a decode step (one column of ids, no autograd) is compiled, batched or not; a prompt, a call without
    # ids and a step under autograd (adapter training) are eager
    with torch.inference_mode():
        step(input_ids=one)
        step(input_ids=one[:1])
        step(input_ids=prompt)
        step(inputs_embeds=torch.zeros(1, 1, 4))
    step(input_ids=one)
    assert calls == ["compiled", "compiled", "eager", "eager", "eager"]


def test_generate_sees_the_compiled_forwards_own_parameters(tiny_model_dir, tmp_path, monkeypatch):
    # Given a model whose decode step is routed through DecodeStep (the compile itself recorded, not run)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    monkeypatch.setattr(compiled_decode, "compiler", lambda: "/usr/bin/c++")
    engine = engine_for(tiny_model_dir, tmp_path)
    assert compiled_decode.compile_decode(engine.model) and compiled_decode.is_compiled(engine.model)
    # Then generate() reads the eager forward's parameters through it: position ids (a left-padded row's positions
    # come from its attention mask) and logits_to_keep (a prompt's logits only at its last position)
    params = inspect.signature(engine.model.forward).parameters
    assert {"position_ids", "logits_to_keep", "attention_mask", "cache"} <= set(params)
    assert engine.model._supports_logits_to_keep()


def test_without_a_compiler_the_worker_says_so_and_decodes_eagerly(tiny_model_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(compiled_decode, "compiler", lambda: None)
    with caplog.at_level(logging.WARNING, logger="worker.engine.compiled_decode"):
        engine = engine_for(tiny_model_dir, tmp_path, compile_decode=True)
    assert engine.report is not None and not engine.report.compiled_decode
    assert not compiled_decode.is_compiled(engine.model) and "no C++ compiler" in caplog.text
    assert engine.reply([], "hello").new_tokens > 0


def test_a_compile_that_fails_at_load_leaves_the_eager_decode(tiny_model_dir, tmp_path, monkeypatch, caplog):
    # Given a compiler that breaks on first use (what a missing header or a broken toolchain does)
    def broken(fn, **kw):
        def call(*a, **k):
            raise RuntimeError("C++ compile error\nmore lines")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    with caplog.at_level(logging.WARNING, logger="worker.engine.compiled_decode"):
        engine = engine_for(tiny_model_dir, tmp_path, compile_decode=True)
    # Then the load still succeeds, says why, and every reply decodes eagerly
    assert engine.report is not None and not engine.report.compiled_decode
    assert "RuntimeError: C++ compile error" in caplog.text and "more lines" not in caplog.text
    assert not compiled_decode.is_compiled(engine.model)
    assert engine.reply([], "hello").new_tokens > 0


@pytest.mark.slow
@pytest.mark.skipif(compiled_decode.compiler() is None, reason="no C++ compiler for Inductor")
def test_compiled_greedy_replies_equal_eager_ones_alone_and_batched(lively_model_dir, tmp_path):
    # Given the model decoding eagerly and the same model with its decode step compiled (int4: the packed kernels
    # inside the compiled graph)
    eager = engine_for(lively_model_dir, tmp_path, quantize="int4")
    compiled = engine_for(lively_model_dir, tmp_path, quantize="int4", compile_decode=True)
    assert compiled.report is not None and compiled.report.compiled_decode
    replies = [eager.reply(h, t) for h, t in REPLY_ITEMS]
    assert len({r.text for r in replies}) == len(replies) and sum(r.new_tokens >= 5 for r in replies) >= 2
    # Then each reply is the eager one, token for token, alone and decoded together
    assert [compiled.reply(h, t).text for h, t in REPLY_ITEMS] == [r.text for r in replies]
    assert [r.text for r in compiled.reply_batch(REPLY_ITEMS)] == [r.text for r in replies]
    # and prompts and sentiment stay on the eager path: the same scores
    texts = [t for _, t in REPLY_ITEMS]
    torch.testing.assert_close(compiled.score(texts).label_logits, eager.score(texts).label_logits)
