"""Which model is loaded, as a name for people and a fingerprint of its weights for machines.

A sentiment head belongs to the model it was trained on; paths cannot say which one that is (the same GGUF lives
at another path on every machine, and runs from a converted cache folder after the first start). The fingerprint
is a hash of the weights themselves: a fixed sample of the token-embedding rows and the final norm, each rounded
to bfloat16, and the model's shape numbers. So it is the same for a GGUF file, its converted cache and a copy
saved in another folder, in float32 or bfloat16 (the dtypes ``auto`` resolves to), and on every machine; other
weights give another one. Weights loaded in float16 are rounded twice on the way to bfloat16, which moves some
values to the neighbouring bfloat16 number, so a float16 run has a fingerprint of its own.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

# Embedding rows hashed, evenly spaced over the vocabulary: enough to tell fine-tunes apart, a few hundred KB.
SAMPLE_ROWS = 64


@dataclass(frozen=True)
class ModelIdentity:
    name: str  # the model's own name (GGUF general.name, hub id, folder name), never a machine's path
    fingerprint: str  # short hex digest of the weights, see the module docstring

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "fingerprint": self.fingerprint}

    def __str__(self) -> str:
        return f"{self.name} [{self.fingerprint}]"


def identify(model_setting: str, model: Any, known_fingerprint: str | None = None) -> ModelIdentity:
    """The identity of ``model``, loaded from ``model_setting`` (``ALLINONE_MODEL``); ``known_fingerprint``: the one
    taken from the float weights before they were quantised (a converted GGUF's cache keeps it)."""
    return ModelIdentity(name=model_name(model_setting), fingerprint=known_fingerprint or fingerprint(model))


def fingerprint(model: Any, embedding: torch.Tensor | None = None) -> str:
    """A digest of the loaded weights that does not depend on where they were stored or on float32 vs bfloat16.
    ``embedding``: the float embedding table, when the model's own holds quantised rows."""
    emb = embedding if embedding is not None else model.get_input_embeddings().weight
    vocab, width = emb.shape
    cfg = model.config
    shape = [int(vocab), int(width)] + [
        getattr(cfg, k, None)
        for k in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size")
    ]
    rows = sorted({i * (vocab - 1) // (SAMPLE_ROWS - 1) for i in range(SAMPLE_ROWS)})
    h = hashlib.sha256(json.dumps(shape).encode())
    with torch.no_grad():
        h.update(_bf16_bytes(emb[rows]))
        norm = _final_norm(model)
        h.update(_bf16_bytes(norm) if norm is not None else b"no final norm")
    return h.hexdigest()[:16]


def _bf16_bytes(t: torch.Tensor) -> bytes:
    # Through float32 (exact from every float dtype), + 0.0 turns -0.0 into 0.0, then round to nearest bfloat16:
    # what a bfloat16 load of float32 weights does. Little-endian bytes whatever the machine.
    b = (t.detach().float() + 0.0).to(torch.bfloat16).contiguous()
    return b.view(torch.int16).numpy().astype("<i2").tobytes()


def decoder_of(model: Any) -> Any:
    """A causal LM's transformer body without its LM head (its last hidden state already normed)."""
    return model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)


def _final_norm(model: Any) -> torch.Tensor | None:
    body = decoder_of(model)
    for name in ("norm", "final_layernorm", "ln_f"):
        w = getattr(getattr(body, name, None), "weight", None)
        if isinstance(w, torch.Tensor):
            return w
    return None


def model_name(model_setting: str) -> str:
    """The model's own name: a GGUF's ``general.name``, a hub id as written, or a model folder's name."""
    path = Path(model_setting).expanduser()
    if path.suffix == ".gguf":
        return (gguf_name(path) if path.is_file() else None) or path.stem
    if not path.exists():
        return model_setting  # a hub id
    try:
        saved = json.loads((path / "config.json").read_text()).get("_name_or_path")
    except (OSError, ValueError):
        saved = None
    # A folder saved from a hub model may remember its id; a path (it names someone's machine) is never a name.
    if isinstance(saved, str) and saved and not Path(saved).is_absolute() and saved.count("/") <= 1:
        return saved
    return path.resolve().name


# GGUF metadata value types (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md): sizes of the scalars.
_GGUF_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def gguf_name(path: Path) -> str | None:
    """``general.name`` from a GGUF file's metadata, read up to that key (never the tensors); None if absent."""
    try:
        with path.open("rb") as f:
            if f.read(4) != b"GGUF" or struct.unpack("<I", f.read(4))[0] < 2:
                return None
            _tensors, n_kv = struct.unpack("<QQ", f.read(16))
            for _ in range(n_kv):
                key = _read_string(f)
                (vtype,) = struct.unpack("<I", f.read(4))
                if key == "general.name" and vtype == _GGUF_STRING:
                    return _read_string(f).strip() or None
                _skip_value(f, vtype)
    except (OSError, struct.error, UnicodeDecodeError, ValueError):
        return None
    return None


def _read_string(f: BinaryIO) -> str:
    (n,) = struct.unpack("<Q", f.read(8))
    if n > 1 << 20:
        raise ValueError("not a GGUF string")
    return f.read(n).decode("utf-8")


def _skip_value(f: BinaryIO, vtype: int) -> None:
    if vtype in _GGUF_SCALAR:
        f.seek(_GGUF_SCALAR[vtype], 1)
    elif vtype == _GGUF_STRING:
        (n,) = struct.unpack("<Q", f.read(8))
        f.seek(n, 1)
    elif vtype == _GGUF_ARRAY:
        (etype,) = struct.unpack("<I", f.read(4))
        (count,) = struct.unpack("<Q", f.read(8))
        if etype in _GGUF_SCALAR:
            f.seek(_GGUF_SCALAR[etype] * count, 1)
        else:
            for _ in range(count):
                _skip_value(f, etype)
    else:
        raise ValueError(f"unknown GGUF value type {vtype}")
