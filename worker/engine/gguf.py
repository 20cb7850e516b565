"""A GGUF loaded straight into quantised linear layers, tensor by tensor, and cached in that form.

The model is built on the ``meta`` device from the GGUF's config (no memory), its Linear layers and its token
embedding replaced by empty quantised ones (:mod:`worker.engine.quant`); then each GGUF tensor is dequantised alone,
quantised at once if it is a linear layer's weight or the embedding table (else cast to the activation dtype), and
dropped: at no point does a float copy of the whole model exist. The result goes into ``ALLINONE_CACHE_DIR`` as one
safetensors file of the quantised state, beside the config and the tokenizer, so every later start only reads that
file (seconds). The model's identity fingerprint (:mod:`worker.engine.identity`) is taken from the float embedding
rows during the conversion and kept in that file's metadata: it names the model, whatever form its weights run in.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from worker import prompts
from worker.engine import quant

log = logging.getLogger(__name__)

WEIGHTS_FILE = "quantized.safetensors"
# The layout of the cached state; part of the cache folder's name, so a cache of another layout is never read.
FORMAT = 5  # 2: int8 embedding table, fingerprint in the metadata; 3: the LM head int8 in int4 mode;
# 4: scales in the kernels' dtype (bf16) whatever the activations' dtype; 5: the LM head int4 in int4 mode, with the
# sentiment label rows kept in float32


def skeleton(config: Any, mode: str, dtype: torch.dtype, kept: int = 0) -> Any:
    """The model on the meta device (no memory) with empty quantised layers in place of its Linears and of its token
    embedding (which reads the head's rows when the two are tied). ``kept``: rows an int4 head keeps at full
    precision."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    emb, head_name = model.get_input_embeddings(), quant.head_name(model)
    for name in quant.linear_names(model):
        quant.replace(model, name, quant.empty_quantized(mode, model.get_submodule(name), dtype,
                                                         kept if name == head_name else 0))
    head = quant.tied_quant_head(model)
    model.set_input_embeddings(quant.QuantEmbedding.tied(head) if head is not None
                               else quant.QuantEmbedding(emb.num_embeddings, emb.embedding_dim, dtype, device="meta"))
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


def convert(gguf: Path, mode: str, dtype: torch.dtype) -> tuple[Any, Any, dict[str, torch.Tensor], str]:
    """Tokenizer, model, its quantised state and the weights fingerprint of a GGUF, without a float copy of the
    whole model."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from worker.engine.identity import fingerprint

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    keep = prompts.label_token_ids(tokenizer)  # the LM-head rows sentiment reads, kept at full precision
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model = skeleton(config, mode, dtype, kept=len(keep))
    linears, head = set(quant.linear_names(plain)), quant.head_name(plain)
    state: dict[str, torch.Tensor] = {}
    embedding_param = next(n for n, p in plain.named_parameters() if p is plain.get_input_embeddings().weight)
    emb_module = quant.embedding_name(model)
    embedding: torch.Tensor | None = None
    for name, t in gguf_tensors(gguf, plain):
        layer, _, kind = name.rpartition(".")
        if kind == "weight" and layer in linears:
            q = quant.quantized(mode, t, None, dtype, keep if layer == head else ())
            state.update({f"{layer}.{k}": v for k, v in q.state_dict().items() if k != "bias"})
        elif name == embedding_param:
            embedding = t  # float32: a tied head's own quantised copy, and the fingerprint
            if model.get_input_embeddings().tied_to is None:
                e = quant.QuantEmbedding.from_weight(t, dtype)
                state.update({f"{emb_module}.{k}": v for k, v in e.state_dict().items()})
        else:
            state[name] = t.to(dtype)
    if embedding is None:
        raise RuntimeError("the GGUF has no token embedding")
    if head is not None and f"{head}.qweight" not in state:
        q = quant.quantized(mode, embedding, None, dtype, keep)
        state.update({f"{head}.{k}": v for k, v in q.state_dict().items() if k != "bias"})
    del plain
    materialize(model, state)
    return tokenizer, model, state, fingerprint(model, embedding=embedding)


SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "I8": torch.int8,
                      "U8": torch.uint8, "I32": torch.int32, "I64": torch.int64}


def read_aligned(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A safetensors file read tensor by tensor into torch's own (aligned) memory, and its metadata.

    Not memory-mapped: a tensor in a safetensors file starts wherever the previous one ended, and torch's packed
    int8/int4 kernels load their weights with aligned vector loads (a mapped weight crashed them); a plain read
    also keeps the resident memory at one copy of the weights."""
    import json

    out: dict[str, torch.Tensor] = {}
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        metadata = header.pop("__metadata__", None) or {}
        for name, meta in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            start, end = meta["data_offsets"]
            t = torch.empty(meta["shape"], dtype=SAFETENSORS_DTYPES[meta["dtype"]])
            f.seek(8 + n + start)
            if end > start and f.readinto(t.view(-1).view(torch.uint8).numpy()) != end - start:
                raise OSError(f"{path}: truncated at {name}")
            out[name] = t
    return out, metadata


def load(gguf: Path, cached: Path, mode: str, dtype: torch.dtype) -> tuple[Any, Any, bool, str]:
    """Tokenizer and quantised model of ``gguf``: from ``cached`` when it is complete, else converted and saved
    there (atomically: a worker killed mid-save leaves a .tmp folder, never a half cache). Third: from the cache;
    fourth: the weights fingerprint, taken from the float weights at conversion."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoTokenizer

    if (cached / "config.json").is_file():
        config = AutoConfig.from_pretrained(str(cached))
        state, metadata = read_aligned(cached / WEIGHTS_FILE)
        kept = next((t.numel() for name, t in state.items() if name.endswith(".kept_ids")), 0)
        model = skeleton(config, mode, dtype, kept)
        materialize(model, state)
        return AutoTokenizer.from_pretrained(str(cached)), model, True, metadata["fingerprint"]
    log.info("converting %s once (%s weights); next start loads %s", gguf.name, mode, cached)
    tokenizer, model, state, fp = convert(gguf, mode, dtype)
    tmp = cached.with_name(cached.name + f".tmp-{os.getpid()}")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / WEIGHTS_FILE),
                  metadata={"fingerprint": fp, "format": str(FORMAT)})
        tokenizer.save_pretrained(tmp)
        model.config.save_pretrained(tmp)  # config.json last: its presence marks a complete cache
        os.replace(tmp, cached)
    except OSError as e:
        log.warning("could not cache converted weights in %s (%s); the next start converts again", cached, e)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return tokenizer, model, False, fp
