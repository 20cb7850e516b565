"""Reading torch's packed int4 weights back: the layout of ``aten._convert_weight_to_int4pack_for_cpu``.

The int4 kernel stores a weight in its own blocked layout; a whole layer unpacked (:func:`unpack_int4`) feeds the
dequantised GEMM of a big batch, a few rows gathered (:func:`int4_rows`) are an embedding lookup from a tied 4-bit
LM head. :func:`int4_layout_ok` checks both against the running torch once, so a torch that changes its layout
makes the callers fall back to the kernel itself instead of reading wrong numbers.
"""

from __future__ import annotations

import torch


def unpack_int4(packed: torch.Tensor, n: int, k: int, out: torch.Tensor | None = None,
                scratch: torch.Tensor | None = None) -> torch.Tensor:
    """The 4-bit values (0..15) of a weight [n, k] packed by ``aten._convert_weight_to_int4pack_for_cpu``,
    **transposed**: [k, n], written into ``out`` (any dtype) when given, else as uint8. ``scratch``: at least
    n * k / 2 bytes to reuse for the nibbles on their way (else allocated).

    The layout is the kernel's (``weight_to_int4pack_kernel`` in torch's ``int4mm_kernel.cpp``): rows in blocks of
    64 under AVX-512, 32 otherwise, each block stored k-major as [k, block / 2] bytes. In a full vectorised block the
    low nibbles hold the block's first half of rows and the high nibbles the second; a partial block, and every
    block of the scalar build, holds row pairs (2i low, 2i+1 high). k-major is why the result is transposed: each
    block's row of nibbles lands as one contiguous run (writing [n, k] was a strided scatter, slower than the GEMM
    it fed). :func:`int4_layout_ok` checks all this against the running torch once.

    Each nibble plane is taken in the packed bytes' own order into ``scratch``, then copied (and converted) to its
    place: as bytes, 0.6 ms for a 4864 x 896 layer on 2 cores, where taking it through the transposed view was
    1.3 ms and a fresh temporary per plane 2.5 ms (over 1 MiB: mapped and unmapped at every call under the
    engine's allocation policy)."""
    capability = torch.backends.cpu.get_cpu_capability()
    vectorised = capability.startswith(("AVX512", "AVX2"))
    block = 64 if capability.startswith("AVX512") else 32
    out = torch.empty(k, n, dtype=torch.uint8) if out is None else out
    scratch = torch.empty(n * k // 2, dtype=torch.uint8) if scratch is None else scratch
    flat, full = packed.reshape(-1), n // block
    if full:
        b = flat[: full * k * block // 2].view(full, k, block // 2)
        cols = out[:, : full * block].view(k, full, block).transpose(0, 1)  # [full, k, block]: b's order
        lo, hi = (cols[..., : block // 2], cols[..., block // 2:]) if vectorised else (cols[..., 0::2], cols[..., 1::2])
        plane = scratch[: b.numel()].view_as(b)
        lo.copy_(torch.bitwise_and(b, 15, out=plane))
        hi.copy_(torch.bitwise_right_shift(b, 4, out=plane))
    if n > full * block:
        b = flat[full * k * block // 2:].view(k, (n - full * block) // 2)
        tail = out[:, full * block:]
        tail[:, 0::2].copy_(b & 15)  # a partial block: a few rows, small temporaries
        tail[:, 1::2].copy_(b >> 4)
    return out


def int4_rows(packed: torch.Tensor, n: int, k: int, rows: torch.Tensor) -> torch.Tensor:
    """The 4-bit values (0..15) of some rows of a packed weight [n, k] (same layout as :func:`unpack_int4`):
    [len(rows), k] uint8, gathered without unpacking the blocks around them (an embedding lookup reads a
    few rows of a 151,936-row table)."""
    capability = torch.backends.cpu.get_cpu_capability()
    vectorised = capability.startswith(("AVX512", "AVX2"))
    block = 64 if capability.startswith("AVX512") else 32
    flat, full = packed.reshape(-1), n // block
    rows = rows.reshape(-1).long()
    out = torch.empty(len(rows), k, dtype=torch.uint8)
    in_full = rows < full * block
    if in_full.any():
        r = rows[in_full]
        b, j = r // block, r % block
        # Within a full block: a vectorised build keeps the first half of the rows in the low nibbles, a scalar one
        # keeps row pairs (2i low, 2i+1 high).
        col, high = (j % (block // 2), j >= block // 2) if vectorised else (j // 2, j % 2 == 1)
        blocks = flat[: full * k * block // 2].view(full, k, block // 2)
        byte = blocks[b, :, col]  # [r, k]
        out[in_full] = torch.where(high[:, None], byte >> 4, byte & 15)
    if not in_full.all():
        r = rows[~in_full] - full * block
        tail = flat[full * k * block // 2:].view(k, (n - full * block) // 2)
        byte = tail[:, r // 2].T  # [r, k]
        out[~in_full] = torch.where((r % 2 == 1)[:, None], byte >> 4, byte & 15)
    return out


_layout_checked: dict[str, bool] = {}


def int4_layout_ok() -> bool:
    """Whether :func:`unpack_int4` reads this torch's packing right (a full and a partial block, once per process).

    Where it does not (a torch that changed its layout), int4 layers stay on the packed kernel for every call and
    read rows back through it: slower for batches, never wrong."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in _layout_checked:
        q = torch.randint(0, 16, (80, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
        try:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
            _layout_checked[capability] = torch.equal(unpack_int4(packed, 80, 64).T.to(torch.int32), q)
        except RuntimeError:
            _layout_checked[capability] = False
    return _layout_checked[capability]
