"""Making the loaded model fast on this CPU: threads, weight-only quantisation, packed bf16 weights.

Nothing here changes what the model computes beyond the rounding of its dtype and, when asked, of its weights
(quantisation); every function runs once, at load.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from worker.engine import quant
from worker.engine.int4pack import int4_layout_ok
from worker.settings import Settings, cpu_has_native_bf16

log = logging.getLogger(__name__)


def set_threads(threads: int) -> None:
    """Before anything runs in parallel: interop threads can only be set once per process.

    Warns when the environment tells OpenMP to put its threads to sleep between parallel regions: a decode step is
    ~170 short regions, and with ``OMP_WAIT_POLICY=PASSIVE`` replies decoded at half the rate (docs/benchmark.md).
    The default already stops spinning after a short while, so an idle worker does not hold the cores."""
    if os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE":
        log.warning("OMP_WAIT_POLICY=PASSIVE: the model's threads sleep between its many short parallel steps, "
                    "which halved reply decoding where measured; unset it unless the cores must be shared")
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass


# glibc serves an allocation this large or larger from its own mapping: the largest threshold it accepts on a 64-bit
# system. Every activation of a forward pass is below it (a 2,048-token pass's widest, [2048, 4864] in bf16, is 19 MiB).
MMAP_THRESHOLD = 32 << 20
# A trim threshold no free heap top reaches: glibc never gives memory back by itself, only when asked.
NO_SELF_TRIM = 1 << 30
# mallopt's parameter numbers (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4


def huge_pages() -> None:
    """Ask torch to back its buffers of 2 MiB and more with transparent huge pages (Linux; before loading).

    A buffer in its own mapping is page-faulted in at each use; with ``THP_MEM_ALLOC_ENABLE`` torch aligns such
    buffers to 2 MiB and advises huge pages for them (``madvise``), so one fault maps 2 MiB. Measured on the Xeon
    with AMX, when every activation of 1 MiB and more had its own mapping, bulk sentiment of 192 dev messages:
    17.0-17.2 messages/s without, 20.2-22.8 with, peak RSS 1181 and 1178 MiB. torch reads the variable once, at
    its first allocation: set here, at load, it takes effect in a worker (whose first tensors are the model's); a
    process that allocated tensors before keeps torch's default. A ``THP_MEM_ALLOC_ENABLE`` in the environment is
    the user's own choice and left alone, and where the kernel's huge pages are off
    (``/sys/kernel/mm/transparent_hugepage/enabled`` is ``never``) the advice changes nothing."""
    if sys.platform.startswith("linux"):
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def reuse_freed_memory() -> None:
    """Serve a call's activations from the heap, where the next layer reuses them (glibc only; once, before loading).

    A forward pass allocates and frees the same few buffers in every layer. Given their own mappings (glibc's
    way for blocks over its mmap threshold), each is faulted in and zeroed by the kernel again at every use: on
    the Zen 5 of a later stop, large passes ran 10-25 % faster without that, huge pages or not. In the heap,
    the second layer reuses the first one's blocks. The threshold is fixed at :data:`MMAP_THRESHOLD` (which also
    stops glibc from moving it) and the heap is never trimmed on its own in the middle of a pass; the engine gives
    the freed memory back after each call instead (:func:`give_back_freed_memory`), so the resident memory
    between calls stays that of the loaded model. A ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_`` in
    the environment is the user's own choice and left alone."""
    params = []
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        params.append((M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        params.append((M_TRIM_THRESHOLD, NO_SELF_TRIM))
    _mallopt(*params)


def give_back_freed_memory() -> None:
    """Return the heap's free pages to the system (glibc's ``malloc_trim``; elsewhere nothing): after a call,
    whatever its activations took is resident no more. It costs the next call the faults of its first layer."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _glibc() -> Any:
    """The C library when it is glibc (``mallopt``, ``malloc_trim``); None elsewhere (musl, macOS), where the
    allocator's own policy stands."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def _mallopt(*params: tuple[int, int]) -> None:
    """glibc's ``mallopt`` for each (parameter, value); elsewhere the allocator's own policy stands."""
    libc = _glibc()
    if libc is None:
        return
    refused = [p for p, v in params if not libc.mallopt(p, v)]
    if refused:
        log.debug("mallopt refused parameters %s", refused)


def keep_freed_memory() -> None:
    """Keep every freed buffer in the heap for the next step, however large (glibc only; for training).

    The worker reuses freed blocks within a call and gives them back after it (:func:`reuse_freed_memory`), but
    glibc serves blocks over 32 MiB from their own mappings whatever the threshold, and a training step's
    activations and gradients are such blocks: each step faulted them in again and the kernel zeroed them.
    Measured on the stand-in (batches of 32 messages, 2 threads): a third of the CPU time in the kernel clearing
    pages and 20-28 s a batch, against 11 s a batch with freed memory kept. No mappings make every block a heap
    block that the next step reuses; the heap then holds the step's peak until the process ends, which is what a
    training process wants. A ``MALLOC_MMAP_MAX_`` in the environment is the user's own choice and left alone."""
    if "MALLOC_MMAP_MAX_" not in os.environ:
        _mallopt((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, NO_SELF_TRIM))


# The row counts :func:`calibrate_dequant_rows` tries below quant.DEQUANT_ROWS: where a CPU's GEMM is fast (AMX: a
# 42-row bf16 GEMM of a 4864 x 896 layer took 0.57 ms, the int4 kernel 3.2 ms) the crossover is far lower.
DEQUANT_CANDIDATES = (16, 24, 32, 48, 64, 96)


def calibrate_dequant_rows(model: torch.nn.Module, repeats: int = 3) -> int:
    """Set ``quant.DEQUANT_ROWS`` to the fewest rows at which one decoder layer's quantised projections run faster
    dequantised than on their packed kernels, timed on this CPU (a few tens of milliseconds, at load); returns it.

    The crossover is a property of the machine, not of the model: at 42 rows the int4 kernel cost 5.6x a bf16
    GEMM on a CPU with AMX, where a CPU without a matrix unit has its GEMM several times slower. Each path is timed
    ``repeats`` times, the fastest counting (the least disturbed by anything else on the machine). Where no
    candidate wins, the threshold stays at the default."""
    # The first decoder layer's projections (Qwen2/Llama names): the mix of shapes every layer runs.
    layer = [m for name, m in model.named_modules() if isinstance(m, (quant.Int8Linear, quant.Int4Linear))
             and ".layers.0." in f".{name}" and m.in_features * m.out_features <= quant.DEQUANT_MAX_WEIGHTS]
    if not layer or (isinstance(layer[0], quant.Int4Linear) and not int4_layout_ok()):
        return quant.DEQUANT_ROWS
    dtype = layer[0].dtype

    def packed(xs: list[torch.Tensor]) -> None:
        with quant.packed_kernels_only():
            for m, x in zip(layer, xs, strict=True):
                m(x)

    def dequantised(xs: list[torch.Tensor]) -> None:
        for m, x in zip(layer, xs, strict=True):
            torch.nn.functional.linear(x, m.dequantized(dtype), m.bias)

    def best(fn: Callable[[list[torch.Tensor]], None], xs: list[torch.Tensor]) -> float:
        fn(xs)  # the first call allocates the scratch buffers
        out = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(xs)
            out = min(out, time.perf_counter() - t0)
        return out

    chosen = quant.DEQUANT_ROWS_DEFAULT
    with torch.inference_mode():
        for rows in DEQUANT_CANDIDATES:
            xs = [torch.randn(rows, m.in_features, dtype=dtype) for m in layer]
            if best(dequantised, xs) < best(packed, xs):
                chosen = rows
                break
    quant.DEQUANT_ROWS = chosen
    return chosen


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
        if settings.dequant_rows:
            quant.DEQUANT_ROWS = settings.dequant_rows
        else:
            rows = calibrate_dequant_rows(model)
            log.info("quantised layers dequantise from %d rows (timed on this CPU)", rows)
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
