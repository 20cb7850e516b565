"""Where weights come from: the dtype rule, and the converted-weights cache of a GGUF file."""

from __future__ import annotations

from pathlib import Path

import torch

from worker.engine import converted_cache_path, gguf_cache_dir, load_dtype
from worker.settings import Settings


def test_gguf_cache_dir_changes_when_the_file_changes(tmp_path: Path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + b"\0" * 100)
    a = gguf_cache_dir(f, tmp_path / "cache", "float32")
    assert a == gguf_cache_dir(f, tmp_path / "cache", "float32")
    assert a != gguf_cache_dir(f, tmp_path / "cache", "bfloat16")
    f.write_bytes(b"GGUF" + b"\1" * 100)
    assert a != gguf_cache_dir(f, tmp_path / "cache", "float32")


def test_quantised_layers_compute_in_the_resolved_dtype():
    assert load_dtype(Settings(dtype="bfloat16", quantize="int8")) == "bfloat16"
    assert load_dtype(Settings(dtype="float32", quantize="int4")) == "float32"
    assert load_dtype(Settings(dtype="auto")) == Settings(dtype="auto").resolved_dtype()


def test_converted_cache_path_is_the_folder_load_fills_and_none_without_a_gguf(tmp_path: Path, tiny_model_dir):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + b"\0" * 100)
    s = Settings(model=str(f), cache_dir=tmp_path / "cache", dtype="bfloat16", quantize="none")
    assert converted_cache_path(s) == gguf_cache_dir(f, tmp_path / "cache", "bfloat16")
    # quantised weights are cached apart from plain ones, and apart from each other
    q8 = converted_cache_path(s.model_copy(update={"quantize": "int8"}))
    q4 = converted_cache_path(s.model_copy(update={"quantize": "int4"}))
    assert len({q8, q4, converted_cache_path(s)}) == 3
    assert converted_cache_path(Settings(model=str(tiny_model_dir))) is None
    assert converted_cache_path(Settings(model="Qwen/Qwen1.5-0.5B-Chat")) is None
    assert converted_cache_path(Settings(model=str(tmp_path / "missing.gguf"))) is None


def test_an_int4_cache_is_never_shared_between_cpus_that_pack_it_differently(monkeypatch):
    # torch packs 4-bit weights in blocks of 64 rows under AVX-512 and of 32 under AVX2: a cache is per capability
    from worker.engine.loading import cache_key

    keys = {}
    for cap in ("AVX2", "AVX512"):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda cap=cap: cap)
        keys[cap] = {m: cache_key(Settings(quantize=m, dtype="float32")) for m in ("int4", "int8", "none")}
    assert keys["AVX2"]["int4"] != keys["AVX512"]["int4"]
    # int8 weights are plain rows and plain weights are plain: those caches are shared
    assert keys["AVX2"]["int8"] == keys["AVX512"]["int8"] and keys["AVX2"]["none"] == keys["AVX512"]["none"]
