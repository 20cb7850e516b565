"""A GGUF loaded straight into quantised linear layers, tensor by tensor, and cached in that form.

The model is built on the ``meta`` device from the GGUF's config (no memory), its Linear layers replaced by empty
quantised ones (:mod:`worker.engine.quant`); then each GGUF tensor is dequantised alone, quantised at once if it is
a linear layer's weight (else cast to the activation dtype), and dropped: at no point does a float copy of the whole
model exist. The result goes into ``ALLINONE_CACHE_DIR`` as one safetensors file of the quantised state, beside the
config and the tokenizer, so every later start only maps that file in (seconds).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from worker.engine import quant

log = logging.getLogger(__name__)

WEIGHTS_FILE = "quantized.safetensors"


def skeleton(config: Any, mode: str, dtype: torch.dtype) -> Any:
    """The model on the meta device (no memory) with empty quantised layers in place of its Linears."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name in quant.linear_names(model):
        quant.replace(model, name, quant.empty_quantized(mode, model.get_submodule(name), dtype))
    return model


def materialize(model: Any, state: dict[str, torch.Tensor]) -> Any:
    """Fill the meta model with ``state`` (assigned, not copied) and rebuild what no state dict holds: the
    rotary embedding's computed buffers."""
    model.load_state_dict(state, assign=True, strict=True)
    for name, mod in list(model.named_modules()):
        if name.endswith("rotary_emb"):
            with torch.device("cpu"):
                quant.replace(model, name, type(mod)(config=model.config))
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left unloaded: {left[:5]}")
    model.eval()
    return model


def gguf_tensors(gguf: Path, model: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """(state-dict name, float32 tensor) for each GGUF tensor the model has, one at a time (the reader maps the
    file; each tensor is dequantised only when asked for). Names and layouts as transformers converts them."""
    import numpy as np
    from gguf import GGUFReader, dequantize
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
        read_field,
    )

    parsed = load_gguf_checkpoint(str(gguf), return_tensors=False)
    reader = GGUFReader(str(gguf))
    arch = read_field(reader, "general.architecture")[0]
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=parsed.get("config", {}))
    names = get_gguf_hf_weights_map(model, processor)
    for t in reader.tensors:
        res = processor.process(weights=dequantize(t.data, t.tensor_type), name=t.name,
                                tensor_key_mapping=names, parsed_parameters=parsed)
        if res.name in names:
            yield names[res.name], torch.from_numpy(np.require(res.weights, np.float32, ["C", "W"]))


def convert(gguf: Path, mode: str, dtype: torch.dtype) -> tuple[Any, Any, dict[str, torch.Tensor]]:
    """Tokenizer, config and the quantised state of a GGUF, without a float copy of the whole model."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    linears = set(quant.linear_names(plain))
    state: dict[str, torch.Tensor] = {}
    embedding_name = next(n for n, p in plain.named_parameters() if p is plain.get_input_embeddings().weight)
    embedding: torch.Tensor | None = None
    for name, t in gguf_tensors(gguf, plain):
        layer, _, kind = name.rpartition(".")
        if kind == "weight" and layer in linears:
            q = quant.quantized(mode, t, None, dtype)
            state.update({f"{layer}.{k}": v for k, v in q.state_dict().items() if k != "bias"})
        else:
            state[name] = t.to(dtype)
            if name == embedding_name:
                embedding = t  # float32, for a tied head's own quantised copy
    out = plain.get_output_embeddings()
    head = next((n for n in linears if plain.get_submodule(n) is out), None)
    if head is not None and f"{head}.qweight" not in state:
        if embedding is None:
            raise RuntimeError("the GGUF has neither an output head nor the token embedding it is tied to")
        q = quant.quantized(mode, embedding, None, dtype)
        state.update({f"{head}.{k}": v for k, v in q.state_dict().items() if k != "bias"})
    del embedding, plain
    return tokenizer, config, state


SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "I8": torch.int8,
                      "U8": torch.uint8, "I32": torch.int32, "I64": torch.int64}


def read_aligned(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file read tensor by tensor into torch's own (aligned) memory.

    Not memory-mapped: a tensor in a safetensors file starts wherever the previous one ended, and torch's packed
    int8/int4 kernels load their weights with aligned vector loads (a mapped weight crashed them); a plain read
    also keeps the resident memory at one copy of the weights."""
    import json

    out: dict[str, torch.Tensor] = {}
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        for name, meta in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            start, end = meta["data_offsets"]
            t = torch.empty(meta["shape"], dtype=SAFETENSORS_DTYPES[meta["dtype"]])
            f.seek(8 + n + start)
            if end > start and f.readinto(t.view(-1).view(torch.uint8).numpy()) != end - start:
                raise OSError(f"{path}: truncated at {name}")
            out[name] = t
    return out


def load(gguf: Path, cached: Path, mode: str, dtype: torch.dtype) -> tuple[Any, Any, bool]:
    """Tokenizer and quantised model of ``gguf``: from ``cached`` when it is complete, else converted and saved
    there (atomically: a worker killed mid-save leaves a .tmp folder, never a half cache). Third: from the cache."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoTokenizer

    if (cached / "config.json").is_file():
        config = AutoConfig.from_pretrained(str(cached))
        model = skeleton(config, mode, dtype)
        materialize(model, read_aligned(cached / WEIGHTS_FILE))
        return AutoTokenizer.from_pretrained(str(cached)), model, True
    log.info("converting %s once (%s weights); next start loads %s", gguf.name, mode, cached)
    tokenizer, config, state = convert(gguf, mode, dtype)
    model = skeleton(config, mode, dtype)
    materialize(model, state)
    tmp = cached.with_name(cached.name + f".tmp-{os.getpid()}")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / WEIGHTS_FILE))
        tokenizer.save_pretrained(tmp)
        config.save_pretrained(tmp)  # config.json last: its presence marks a complete cache
        os.replace(tmp, cached)
    except OSError as e:
        log.warning("could not cache converted weights in %s (%s); the next start converts again", cached, e)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return tokenizer, model, False
