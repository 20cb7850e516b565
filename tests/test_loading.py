"""Where weights come from: the dtype rule, and the converted-weights cache of a GGUF file."""

from __future__ import annotations

from pathlib import Path

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
