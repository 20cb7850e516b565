"""Weight-only quantised linear layers on torch's own CPU kernels (``ALLINONE_QUANTIZE`` int8 / int4).

Decoding one token reads every weight once, so its speed is set by the bytes of the weights: int8 weights read a
quarter of float32's, 4-bit an eighth. Only the weights are quantised; activations stay in the model's float dtype
(bf16 where the CPU computes it natively, else float32) and meet the packed kernels in bf16 (:data:`KERNEL_DTYPE`),
so a message's scores do not depend on what else is in its batch or its prompt (dynamic int8 scaled activations
per forward pass, which made cached and plain scores differ).

Two paths per call, by its rows (:data:`DEQUANT_ROWS`): few rows (a decode step, a live message) go through the
packed kernel, which reads the small weights; many rows (a bulk sentiment batch, a long prompt) dequantise the
layer once into a reused buffer and run one plain GEMM, which the packed kernels cannot match at hundreds of rows.
Generation stays on the packed kernels (:func:`packed_kernels_only`).

- :class:`Int8Linear`: one scale per output channel, ``aten._weight_int8pack_mm``.
- :class:`Int4Linear`: a scale and an offset per group of input channels, ``aten._weight_int4pack_mm_for_cpu``.
  In ``int4`` mode the LM head is 4-bit too: it is 136 M of a 0.5B model's parameters, and at one token a step the
  int8 head took 11 ms of a 36 ms step where the int4 one takes 4.5 ms. It keeps the sentiment label rows at full
  precision beside the 4-bit ones: on the stand-in, scoring through 4-bit label rows moved English test accuracy
  1.0 point below float32's, through the kept rows 0.5, as with the int8 head (docs/benchmark.md).
- :class:`QuantEmbedding`: the token-embedding table in int8 rows with one scale each (the table is 136 M of a
  0.5B model's parameters; in bf16 it alone was 272 MiB). A table tied to the LM head reads the head's own rows
  (int8 or int4): the same numbers, kept once.

Both take ``x`` [..., in_features] and return [..., out_features] and carry ``in_features``/``out_features``, like
a Linear, so anything that wraps a linear layer wraps them. Their tensors are buffers: ``state_dict()`` holds them
and ``load_state_dict(assign=True)`` fills them (the converted-weights cache, :mod:`worker.engine.gguf`).
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Callable, Iterator

import torch

from worker.engine.int4pack import int4_layout_ok, int4_rows, unpack_int4

MODES = ("int8", "int4")
# Input channels per int4 scale: smaller groups follow the weights more closely, larger ones read fewer scales.
INT4_GROUP = 32
# The activations' and scales' dtype at torch's packed kernels. Their vectorised paths (AVX2, AVX-512) are written
# for bf16: with float32 input the same int4 call ran 30x slower and int8 10x slower (a scalar loop). A float32
# model (a CPU without native bf16) keeps float32 everywhere else and casts at the kernel's edge.
KERNEL_DTYPE = torch.bfloat16
# From this many rows a call dequantises the weight to the activations' dtype and runs one plain GEMM instead:
# the packed kernels expand the weights again for every 4 rows (int4) or run without blocking (int8), and a
# batched prefill of 1,024 rows was 3-4x faster dequantised (docs/benchmark.md). Decode steps (1-16 rows) stay on
# the packed kernels, which read 4-8x fewer bytes. The worker times the crossover on its CPU at load and lowers
# DEQUANT_ROWS where dequantising wins earlier (worker.engine.cpu.calibrate_dequant_rows).
DEQUANT_ROWS_DEFAULT = DEQUANT_ROWS = 128
# ...for layers of at most this many weights: a dequantised LM head (136 M weights) would be a 272 MiB transient.
DEQUANT_MAX_WEIGHTS = 16 * 2**20
# Rows per call when reading a layer's weights back without a GEMM of the whole table (a few MiB at a time).
WEIGHT_ROWS_CHUNK = 32


_packed_only = contextvars.ContextVar("packed_only", default=False)


@contextlib.contextmanager
def packed_kernels_only() -> Iterator[None]:
    """Every quantised layer on its packed kernel inside the block, however many rows a call has.

    The two paths round differently (bf16 activations into the kernel, a bf16 or float32 dequantised weight in the
    GEMM), so a row's numbers would depend on how many rows share its call. Replies need a row to come out the
    same alone and in a batch (greedy decoding amplifies any difference into other tokens), so generation runs
    here; sentiment batches take the fast path and their labels are checked against the plain pass (the bench)."""
    token = _packed_only.set(True)
    try:
        yield
    finally:
        _packed_only.reset(token)


def _dequantises(module: torch.nn.Module, rows: int) -> bool:
    return (rows >= DEQUANT_ROWS and module.in_features * module.out_features <= DEQUANT_MAX_WEIGHTS
            and not _packed_only.get() and (not isinstance(module, Int4Linear) or int4_layout_ok()))


def _linear(module: Int8Linear | Int4Linear, x: torch.Tensor,
            kernel: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``x`` [..., in] through a quantised layer: one GEMM on its dequantised weight for many rows, else its packed
    ``kernel`` (bf16 [rows, in] -> [rows, out]), with the bias added in the activations' dtype."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if _dequantises(module, x2.shape[0]):
        y = torch.nn.functional.linear(x2, module.dequantized(x.dtype), module.bias)
    else:
        # The kernels refuse a strided view (a batch's attention output reaches o_proj as one).
        y = kernel(x2.to(KERNEL_DTYPE).contiguous()).to(x.dtype)
        if module.bias is not None:
            y = y + module.bias
    return y.reshape(*shape[:-1], module.out_features)


_scratch = threading.local()  # per thread: two threads' forward passes must not share one buffer


def _buffer(numel: int, dtype: torch.dtype, reuse: bool) -> torch.Tensor:
    """``numel`` elements to dequantise into: one buffer per dtype reused by every layer when ``reuse`` (the
    weight is consumed by the GEMM right after), else fresh memory (autograd may keep the weight for backward).

    Reused because fresh weight-sized buffers at every call were page faults that cost more than the GEMM they fed
    (measured when every block of 1 MiB and more had its own mapping; the heap reuses blocks now,
    cpu.reuse_freed_memory, and one buffer still keeps a pass's memory to one weight's size)."""
    if not reuse:
        return torch.empty(numel, dtype=dtype)
    buffers = _scratch.__dict__.setdefault("by_dtype", {})
    buf = buffers.get(dtype)
    if buf is None or buf.numel() < numel:
        buf = buffers[dtype] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


def _int8_rows(q: torch.Tensor, scales: torch.Tensor, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``ids`` of an int8 table with one scale per row, dequantised to ``dtype``: [len(ids), columns]."""
    ids = ids.reshape(-1).long()
    return q[ids].to(dtype) * scales[ids].to(dtype)[:, None]


def _scale_zero(sz: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """An int4 layer's ``scales_zeros`` [..., 2] as the factor and offset of ``w = q * scale + zero`` in ``dtype``
    (the kernel computes ``(q - 8) * scale + zero``)."""
    # In ``dtype`` directly, without a float32 copy of the whole tensor (over 1 MiB for a large layer: mapped and
    # unmapped at every call under the engine's allocation policy). The same numbers in bf16: 8 * scale is exact
    # and the difference is rounded once, as from float32.
    scale = sz[..., 0].to(dtype).contiguous()  # (a strided view when already in dtype: slow to broadcast)
    return scale, sz[..., 1].to(dtype) - 8 * scale


class Int8Linear(torch.nn.Module):
    """``x @ (q * scale).T + bias`` with ``q`` int8 [out, in] and one ``scale`` per output channel.

    ``dtype`` is the activations' (and the bias's); the scales are in :data:`KERNEL_DTYPE`."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.dtype = in_features, out_features, dtype
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=KERNEL_DTYPE, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> Int8Linear:
        w = weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
        m = cls(w.shape[1], w.shape[0], bias is not None, dtype)
        m.qweight = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        m.scales = scale.to(KERNEL_DTYPE)
        m.bias = None if bias is None else bias.detach().to(dtype).clone()
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _linear(self, x, lambda xk: torch.ops.aten._weight_int8pack_mm(xk, self.qweight, self.scales))

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The whole weight [out, in] in ``dtype`` (in a reused buffer outside autograd: use it before the next)."""
        w = _buffer(self.qweight.numel(), dtype, reuse=not torch.is_grad_enabled()).view(self.out_features, -1)
        return w.copy_(self.qweight).mul_(self.scales.to(dtype)[:, None])

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``ids`` [r] of the dequantised weight, [r, in] in ``dtype`` (an embedding lookup from a tied head)."""
        return _int8_rows(self.qweight, self.scales, ids, dtype)

    def weight_rows(self, rows: list[int]) -> torch.Tensor:
        """Rows of the dequantised weight, in float32 (the sentiment label rows of an LM head)."""
        return self.rows(torch.tensor(rows), torch.float32)


class Int4Linear(torch.nn.Module):
    """4-bit weights in groups of ``group`` input channels, each group with its own scale and offset
    (asymmetric: ``w = q * scale + min``, q in 0..15), packed once into the layout of torch's CPU kernel.

    ``dtype`` is the activations' (and the bias's); scales and offsets are in :data:`KERNEL_DTYPE`."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, group: int = INT4_GROUP,
                 device: torch.device | str | None = None, kept: int = 0) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group, self.dtype = in_features, out_features, group, dtype
        self.register_buffer("qweight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales_zeros",
                             torch.empty(in_features // group, out_features, 2, dtype=KERNEL_DTYPE, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)
        if kept:  # rows kept at full precision beside the 4-bit ones (:meth:`weight_rows`)
            self.register_buffer("kept_ids", torch.empty(kept, dtype=torch.long, device=device))
            self.register_buffer("kept_rows", torch.empty(kept, in_features, dtype=torch.float32, device=device))

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                    group: int = INT4_GROUP, keep: list[int] | tuple[int, ...] = ()) -> Int4Linear:
        """``weight`` in 4 bits; the rows ``keep`` also kept as they are (float32), for :meth:`weight_rows`."""
        w = weight.detach().float()
        n, k = w.shape
        wg = w.reshape(n, k // group, group)
        lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
        scale = ((hi - lo) / 15).clamp(min=1e-12)
        q = torch.round((wg - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).reshape(n, k)
        m = cls(k, n, bias is not None, dtype, group, kept=len(keep))
        if keep:
            m.kept_ids = torch.tensor(list(keep), dtype=torch.long)
            m.kept_rows = w[list(keep)].clone()
        m.qweight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        # The kernel computes (q - 8) * scale + zero: our offset is the group's minimum, so zero = min + 8 scale.
        m.scales_zeros = torch.stack([scale.T, (lo + 8 * scale).T], dim=-1).to(KERNEL_DTYPE).contiguous()
        m.bias = None if bias is None else bias.detach().to(dtype).clone()
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _linear(self, x, lambda xk: torch.ops.aten._weight_int4pack_mm_for_cpu(
            xk, self.qweight, self.group, self.scales_zeros))

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight [out, in] in ``dtype``: the kernel's own arithmetic, ``(q - 8) * scale + zero`` per group. A
        transposed view of a [in, out] tensor (a reused buffer outside autograd: use it before the next call)."""
        n, k, g = self.out_features, self.in_features, self.group
        reuse = not torch.is_grad_enabled()
        wt = unpack_int4(self.qweight, n, k, out=_buffer(n * k, dtype, reuse).view(k, n),
                         scratch=_buffer(n * k // 2, torch.uint8, reuse))
        scale, zero = _scale_zero(self.scales_zeros, dtype)  # [groups, rows] each
        groups = wt.view(k // g, g, n)
        # one pass, in place (elementwise: the overlap is exact); no operand of another dtype, which would be
        # converted into a weight-sized temporary first
        torch.addcmul(zero.unsqueeze(1), groups, scale.unsqueeze(1), out=groups)
        return wt.T

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``ids`` [r] of the dequantised weight, [r, in] in ``dtype`` (an embedding lookup from a tied head):
        the kernel's own arithmetic, ``(q - 8) * scale + zero`` per group, gathered without unpacking the rest."""
        ids = ids.reshape(-1).long()
        if not int4_layout_ok():
            return self._rows_through_kernel(ids).to(dtype)
        k, g = self.in_features, self.group
        q = int4_rows(self.qweight, self.out_features, k, ids).view(len(ids), k // g, g).to(dtype)
        scale, zero = _scale_zero(self.scales_zeros[:, ids].transpose(0, 1), dtype)  # [r, groups] each
        return torch.addcmul(zero[..., None], q, scale[..., None]).reshape(len(ids), k)

    def weight_rows(self, rows: list[int]) -> torch.Tensor:
        """Rows of the weight in float32: the kept rows as they were given, any other dequantised. An int4 LM head
        keeps the sentiment label rows: scored through 4-bit rows, English test accuracy fell 1.0 point below
        float32's, through the kept ones 0.5, as with an int8 head (docs/benchmark.md)."""
        kept = self.kept_ids.tolist() if hasattr(self, "kept_ids") else []
        if set(rows) <= set(kept):
            return self.kept_rows[[kept.index(r) for r in rows]].clone()
        return self.rows(torch.tensor(rows), torch.float32)

    def _rows_through_kernel(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows read through the kernel applied to the identity, a slice at a time (the whole head at once is a
        272 MiB transient): for a torch whose packing :func:`int4_rows` does not read."""
        eye, cols = torch.eye(self.in_features, dtype=KERNEL_DTYPE), []
        for start in range(0, self.in_features, WEIGHT_ROWS_CHUNK):
            w = torch.ops.aten._weight_int4pack_mm_for_cpu(eye[start:start + WEIGHT_ROWS_CHUNK], self.qweight,
                                                          self.group, self.scales_zeros)
            cols.append(w[:, ids].float())  # [chunk, len(ids)]
        return torch.cat(cols).T.contiguous()


class QuantEmbedding(torch.nn.Module):
    """A token-embedding lookup from quantised rows: its own int8 table, one scale per row (``row = q * scale``),
    or, with ``tied_to``, the rows of the LM head quantised from the same table (a tied model: the int8 or int4
    head's numbers, kept once; the lookup holds no tensor of its own)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype,
                 device: torch.device | str | None = None, tied_to: Int8Linear | Int4Linear | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.dtype = num_embeddings, embedding_dim, dtype
        # A plain attribute, not a submodule: the head is the model's own and must not be listed twice.
        self.__dict__["tied_to"] = tied_to
        if tied_to is None:
            self.register_buffer("qweight", torch.empty(num_embeddings, embedding_dim, dtype=torch.int8,
                                                        device=device))
            self.register_buffer("scales", torch.empty(num_embeddings, dtype=KERNEL_DTYPE, device=device))

    @classmethod
    def from_weight(cls, weight: torch.Tensor, dtype: torch.dtype) -> QuantEmbedding:
        q = Int8Linear.from_weight(weight, None, dtype)  # one scale per row: the same rounding as an int8 head
        m = cls(q.out_features, q.in_features, dtype)
        m.qweight, m.scales = q.qweight, q.scales
        return m

    @classmethod
    def tied(cls, head: Int8Linear | Int4Linear) -> QuantEmbedding:
        return cls(head.out_features, head.in_features, head.dtype, tied_to=head)

    def _rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.tied_to is not None:
            return self.tied_to.rows(ids, dtype)
        return _int8_rows(self.qweight, self.scales, ids, dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self._rows(ids, self.dtype).view(*ids.shape, self.embedding_dim)

    def weight_rows(self, rows: list[int]) -> torch.Tensor:
        """Rows of the dequantised table, in float32."""
        return self._rows(torch.tensor(rows), torch.float32)


def int4_group(in_features: int, out_features: int) -> int | None:
    """The int4 group size for a layer's shape, or None when the kernel cannot take it (then it stays int8)."""
    if out_features % 16:
        return None
    for g in sorted({INT4_GROUP, 32}, reverse=True):
        if in_features % g == 0:
            return g
    return None


def quantized(mode: str, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
              keep: list[int] | tuple[int, ...] = ()) -> torch.nn.Module:
    """A quantised layer computing ``weight``'s Linear: ``mode`` int8 or int4 (int8 where int4 cannot be packed).
    In int4 the rows ``keep`` are also kept at full precision (an int8 row is already within 0.4 % of it)."""
    n, k = weight.shape
    group = int4_group(k, n) if mode == "int4" else None
    if group is not None:
        return Int4Linear.from_weight(weight, bias, dtype, group, keep=keep)
    return Int8Linear.from_weight(weight, bias, dtype)


def empty_quantized(mode: str, linear: torch.nn.Module, dtype: torch.dtype, kept: int = 0) -> torch.nn.Module:
    """An unfilled quantised layer of ``linear``'s shape on the meta device (filled by ``load_state_dict``)."""
    k, n, has_bias = linear.in_features, linear.out_features, linear.bias is not None
    group = int4_group(k, n) if mode == "int4" else None
    if group is not None:
        return Int4Linear(k, n, has_bias, dtype, group, device="meta", kept=kept)
    return Int8Linear(k, n, has_bias, dtype, device="meta")


def module_name(model: torch.nn.Module, module: torch.nn.Module | None) -> str | None:
    """The qualified name of ``module`` inside ``model``, or None when it is not there (or None)."""
    return next((n for n, m in model.named_modules() if m is module), None) if module is not None else None


def head_name(model: torch.nn.Module) -> str | None:
    """The qualified name of ``model``'s LM head (its output embedding), or None when it has none."""
    return module_name(model, model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None)


def linear_names(model: torch.nn.Module) -> list[str]:
    """Every nn.Linear of ``model`` by qualified name: the layers quantisation replaces (LM head included)."""
    return [name for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)]


def replace(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantize_model(model: torch.nn.Module, mode: str, dtype: torch.dtype,
                   keep_rows: list[int] | tuple[int, ...] = ()) -> int:
    """Swap every Linear of ``model`` for its quantised form, and its token embedding for a
    :class:`QuantEmbedding`, in place; returns how many Linears. ``keep_rows``: rows of the LM head an int4 head
    also keeps at full precision (the sentiment label rows).

    A head tied to the embedding gets its own quantised form, and the embedding then reads the head's rows."""
    names, head = linear_names(model), head_name(model)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    emb_weight = getattr(emb, "weight", None)
    for name in names:
        lin = model.get_submodule(name)
        replace(model, name, quantized(mode, lin.weight, lin.bias, dtype, keep_rows if name == head else ()))
    if isinstance(emb, torch.nn.Embedding) and emb_weight is not None:
        tied = tied_quant_head(model)
        model.set_input_embeddings(QuantEmbedding.tied(tied) if tied is not None
                                   else QuantEmbedding.from_weight(emb_weight, dtype))
    return len(names)


def quantized_layers(model: torch.nn.Module) -> int:
    """How many of ``model``'s modules are weight-only quantised linear layers."""
    return sum(isinstance(m, (Int8Linear, Int4Linear)) for m in model.modules())


def tied_quant_head(model: torch.nn.Module) -> Int8Linear | Int4Linear | None:
    """The LM head the token embedding reads its rows from: the quantised head of a model that ties the two, else
    None."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    return head if tied and isinstance(head, (Int8Linear, Int4Linear)) else None


def embedding_name(model: torch.nn.Module) -> str:
    """The qualified name of ``model``'s token-embedding module."""
    name = module_name(model, model.get_input_embeddings())
    if name is None:
        raise ValueError("the model has no token-embedding module")
    return name
