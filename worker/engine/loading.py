"""Getting the weights and the tokenizer into memory, and the report of what was loaded.

``ALLINONE_MODEL`` is a hub id, a local model folder, or a ``.gguf`` file. A GGUF is dequantised once (a minute)
into a safetensors folder under ``ALLINONE_CACHE_DIR`` (:func:`gguf_cache_dir`); every later start loads that folder,
memory-mapped, in seconds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from worker import prompts
from worker.engine.identity import ModelIdentity
from worker.errors import ModelLoadError
from worker.settings import Settings

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadReport:
    """What ``Engine.load()`` loaded, how, and at what cost (logged, and in the worker's heartbeat)."""

    model: str
    source: str
    dtype: str
    threads: int
    seconds: float
    rss_bytes: int
    weights_bytes: int
    from_cache: bool
    prefix_tokens: int
    quantize: str
    identity: ModelIdentity
    compiled_decode: bool = False
    dequant_rows: int | None = None  # quantised layers: from this many rows a call dequantises (None: not quantised)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Loaded:
    tokenizer: Any
    model: Any
    source: str  # where the weights were read from: the hub id, the folder, or the GGUF file
    from_cache: bool  # read from the converted-weights cache of a GGUF
    fingerprint: str | None = None  # the weights fingerprint, when the loaded weights no longer show it (quantised)


def load_dtype(settings: Settings) -> str:
    """The dtype of the weights that stay float and of the activations: the configured dtype resolved against
    this CPU (quantised layers compute in it too)."""
    return settings.resolved_dtype()


def cache_key(settings: Settings) -> str:
    """What the converted weights of a GGUF depend on beyond the file: the dtype, and the quantisation mode (whose
    packed int4 layout is torch's own, so its version too, and the CPU's vector width: torch packs 4-bit weights in
    blocks of 64 rows where its kernels run AVX-512 and of 32 rows on AVX2, so a cache packed on one machine reads
    as other numbers on the other, silently)."""
    dtype, mode = load_dtype(settings), settings.resolved_quantize()
    if mode == "none":
        return dtype
    from worker.engine.gguf import FORMAT

    key = f"{mode}-{dtype}-torch{torch.__version__.split('+')[0]}-v{FORMAT}"
    if mode == "int4":
        key += f"-{torch.backends.cpu.get_cpu_capability().lower()}"
    return key


def gguf_cache_dir(gguf: Path, cache_root: Path, dtype: str) -> Path:
    """Where the converted weights of one GGUF file live. Keyed by name, size and a hash of its head and tail,
    so a replaced file is converted again, without reading the whole file at every start."""
    size = gguf.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with gguf.open("rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return cache_root / f"{gguf.stem}-{h.hexdigest()[:16]}-{dtype}"


def converted_cache_path(settings: Settings) -> Path | None:
    """The converted-weights folder ``load()`` reads or fills for these settings; None when the model is no
    (existing) GGUF file, so nothing is converted. The folder is complete once it holds ``config.json``."""
    path = Path(settings.model).expanduser()
    if path.suffix != ".gguf" or not path.is_file():
        return None
    return gguf_cache_dir(path, settings.cache_dir.expanduser(), cache_key(settings))


def load_weights(settings: Settings, dtype: str) -> Loaded:
    """The tokenizer and the model named by ``settings.model``, in ``dtype``, or :class:`ModelLoadError`."""
    try:
        path = Path(settings.model).expanduser()
        if path.suffix == ".gguf":
            if not path.is_file():
                raise ModelLoadError(f"ALLINONE_MODEL names a GGUF file that does not exist: {path}")
            loaded = _load_gguf(path, settings, dtype)
        else:
            source = str(path) if path.exists() else settings.model
            loaded = Loaded(*_load_pretrained(source, settings, dtype), source=source, from_cache=False)
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(
            f"could not load model {settings.model!r}: {type(e).__name__}: {e}. ALLINONE_MODEL takes a hub id "
            "(needs network access or a filled HF cache), a local model folder, or a .gguf file."
        ) from e
    _complete_tokenizer(loaded.tokenizer)
    return loaded


def _load_pretrained(source: str, settings: Settings, dtype: str, **kw: Any) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trc = settings.trust_remote_code
    tok_kw = {k: v for k, v in kw.items() if k != "quantization_config"}  # a model option only
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trc, **tok_kw)
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=DTYPES[dtype], trust_remote_code=trc, low_cpu_mem_usage=True, **kw
    )
    return tokenizer, model


def _load_gguf(gguf: Path, settings: Settings, dtype: str) -> Loaded:
    """Dequantising a GGUF takes a minute; we do it once and keep safetensors in the cache. Quantised modes load
    it tensor by tensor straight into their layers (:mod:`worker.engine.gguf`)."""
    cached = gguf_cache_dir(gguf, settings.cache_dir.expanduser(), cache_key(settings))
    mode = settings.resolved_quantize()
    if mode != "none":
        from worker.engine import gguf as gguf_loader

        tokenizer, model, hit, fp = gguf_loader.load(gguf, cached, mode, DTYPES[dtype])
        return Loaded(tokenizer, model, source=str(cached if hit else gguf), from_cache=hit, fingerprint=fp)
    if (cached / "config.json").is_file():
        return Loaded(*_load_pretrained(str(cached), settings, dtype), source=str(cached), from_cache=True)
    log.info("converting %s once (dequantise to %s); next start loads %s", gguf.name, dtype, cached)
    tokenizer, model = _load_pretrained(str(gguf.parent), settings, dtype, gguf_file=gguf.name, **_gguf_dequantize())
    tmp = cached.with_name(cached.name + f".tmp-{os.getpid()}")
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # rename is atomic: a worker killed mid-save leaves a .tmp folder, never a half cache
        os.replace(tmp, cached)
    except OSError as e:
        log.warning("could not cache converted weights in %s (%s); the next start converts again", cached, e)
        return Loaded(tokenizer, model, source=str(gguf), from_cache=False)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # Run from the cache, as every later start will: memory-mapped weights, the same numbers and memory.
    del model
    return Loaded(*_load_pretrained(str(cached), settings, dtype), source=str(gguf), from_cache=False)


def _gguf_dequantize() -> dict[str, Any]:
    """Ask for plain dense weights: newer transformers keep GGUF blocks packed, which cannot be saved to the cache
    and run through a float32 kernel that casts every bf16 matmul."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always dequantise
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _complete_tokenizer(tok: Any) -> None:
    """A chat template and a pad token, which both prompts and batching need, when the tokenizer lacks them."""
    if not getattr(tok, "chat_template", None):
        log.warning("tokenizer has no chat template; using ChatML")
        tok.chat_template = prompts.CHATML_TEMPLATE
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token


def weights_bytes(model: Any) -> int:
    """Bytes of the model's parameters and buffers (the quantised layers' weights and scales are buffers)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    total += sum(b.numel() * b.element_size() for b in model.buffers())
    return int(total)


def rss_bytes() -> int:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # pragma: no cover - psutil missing
        return 0
