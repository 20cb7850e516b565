"""Making the loaded model fast on this CPU: threads, weight-only quantisation, packed bf16 weights.

Nothing here changes what the model computes beyond the rounding of its dtype and, when asked, of its weights
(quantisation); every function runs once, at load.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from worker.engine import quant
from worker.settings import Settings, cpu_has_native_bf16

log = logging.getLogger(__name__)


def set_threads(threads: int) -> None:
    """Before anything runs in parallel: interop threads can only be set once per process."""
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass


# glibc serves an allocation this large or larger from its own mapping, given back to the system when freed.
MMAP_THRESHOLD = 1 << 20
M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


def return_freed_memory() -> None:
    """Make freed activation buffers leave the process's resident memory (glibc only; once, before loading).

    By default glibc raises its mmap threshold to the size of each large block freed (up to 32 MiB), so after
    the first forward pass a batch's activations (tens of MiB) come from the heap, where freed blocks stay
    resident and fragment: measured on the 0.5B stand-in in int4, peak RSS 1404 MiB → 1135 MiB and steady RSS after
    a sentiment batch 1413 → 975 MiB with a fixed 1 MiB threshold. A ``MALLOC_MMAP_THRESHOLD_`` in the environment
    is the user's own choice and left alone."""
    import ctypes
    import os

    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        ok = ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError):  # not glibc (musl, macOS): its own allocator's policy stands
        return
    if not ok:
        log.debug("mallopt(M_MMAP_THRESHOLD) refused")


def tune(model: Any, settings: Settings, dtype: str, keep_rows: list[int] | tuple[int, ...] = ()) -> Any:
    """The model to run: weight-only quantised when asked (a GGUF arrives already quantised; ``keep_rows``: LM-head
    rows an int4 head keeps at full precision), else with bf16 Linears packed where the CPU has bf16."""
    model.eval()
    model.requires_grad_(False)
    mode = settings.resolved_quantize()
    if mode in quant.MODES:
        n = quant.quantize_model(model, mode, next(model.parameters()).dtype, keep_rows)
        if n:
            log.info("quantised %d linear layers to %s weights", n, mode)
        return model
    if dtype == "bfloat16" and cpu_has_native_bf16():
        log.info("packed %d bf16 Linear layers for oneDNN", pack_bf16_linears(model))
    return model


class PackedLinear(torch.nn.Module):
    """A bf16 Linear whose weight is reordered once into oneDNN's blocked layout.

    A plain bf16 ``F.linear`` reorders its weight on every call: at one token a step that copy costs more than
    the matmul (decode ran at half the memory bandwidth) and, for the LM head, a weight-sized transient buffer.
    The original ``weight`` stays an attribute (tied embeddings, ``get_output_embeddings()`` and the label rows
    read it); its pages are released when they come from a memory-mapped file, so it costs no resident memory.
    """

    def __init__(self, linear: torch.nn.Linear, batch_hint: int = 1) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        # A plain attribute, not a buffer: parameters() and state_dict() see the model's weights once.
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), batch_hint)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")


def pack_bf16_linears(model: torch.nn.Module) -> int:
    """Swap every bf16 Linear of ``model`` for a PackedLinear; returns how many (same results to bf16 rounding)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return 0
    mapped = _file_mappings()
    swaps = [
        (name, mod)
        for name, mod in model.named_modules()
        if type(mod) is torch.nn.Linear and mod.weight.dtype == torch.bfloat16
    ]
    for name, mod in swaps:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, PackedLinear(mod))
        _release_pages(mod.weight, mapped)
    return len(swaps)


def _file_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process mapped from regular files (the safetensors weights among them)."""
    out = []
    try:
        for line in Path("/proc/self/maps").read_text().splitlines():
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].startswith("/") and parts[4] != "0":  # an inode: a real file
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                out.append((lo, hi))
    except OSError:
        pass
    return out


def _release_pages(t: torch.Tensor, mapped: list[tuple[int, int]]) -> None:
    """Drop a file-mapped tensor's resident pages (read back from the file if ever touched again).

    Only whole pages inside the tensor, and only inside a file mapping: anonymous memory would read back zeros."""
    import ctypes
    import mmap

    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    lo = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    hi = end // mmap.PAGESIZE * mmap.PAGESIZE
    if hi <= lo or not any(a <= lo and hi <= b for a, b in mapped):
        return
    try:
        ctypes.CDLL(None, use_errno=True).madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), mmap.MADV_DONTNEED)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass
