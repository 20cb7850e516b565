"""The sentiment adapter: low-rank (LoRA) corrections of the decoder layers' projections, on for sentiment only.

A head can only read the states the frozen model computes; the adapter lets those states change for the one
sentiment task. Each adapted projection ``base`` becomes ``base(x) + scale * B(A(x))`` with ``A`` [r, in] and
``B`` [out, r] (``B`` starts at zero, so a fresh adapter changes nothing). The wrappers are put into the model only
inside :meth:`SentimentAdapter.active` (the sentiment forward passes, the cached prefix among them) and taken out
again on the way out: replies run the very modules they ran before, so greedy replies are byte-identical and pay
nothing for it. Still one model in memory: the adapter is the two small matrices per projection.

Our own few lines rather than PEFT: PEFT wraps ``nn.Linear`` (and its own list of quantised layer types), while the
projections here may be packed bf16 layers (:class:`worker.engine.cpu.PackedLinear`) or weight-only int8/int4
layers of the performance work, which are modules with ``in_features``/``out_features`` but not ``nn.Linear``.
Calling ``base(x)`` and adding the low-rank term works around any of them.

A calibration offset comes with it (``label_offset``, fitted by the trainer on the dev messages after training): a
number added to the positive label's logit, so that the decision threshold sits where the dev set's log-loss is
lowest. An adapter that moves the states leaves the two label words' logits with a bias towards one of them (the
stand-in's read 45 % of balanced messages as positive); one fitted number takes it out (Platt's offset, without
a slope: the adapter's confidences were already calibrated).

On disk: one safetensors file (``<module>.lora_a`` / ``<module>.lora_b``, float32) whose metadata holds the rank,
the scale, the offset and, in ``meta``, the model it was trained on (its identity, see
:mod:`worker.engine.identity`) and the sentiment prompt's fingerprint. The engine refuses an adapter that does not
fit the loaded model (:class:`~worker.errors.AdapterError`). ``python -m worker.train_adapter`` trains one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from worker.errors import AdapterError

if TYPE_CHECKING:
    from worker.engine.identity import ModelIdentity

FORMAT = "allinone-sentiment-adapter/1"
FIX = "train an adapter for this model with python -m worker.train_adapter, or unset ALLINONE_SENTIMENT_ADAPTER"
# The projections of a decoder layer (Qwen2/Llama names): attention, then MLP.
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
_LAYER = re.compile(r"\.layers\.(\d+)\.")


class LoRA(torch.nn.Module):
    """``base(x) + scale * (x A^T) B^T``, around any module with ``in_features`` and ``out_features``."""

    def __init__(self, base: torch.nn.Module, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = int(base.in_features), int(base.out_features)
        # The adapter's own tensors, not copies: training the adapter trains what ``active`` puts in.
        self.lora_a = a if isinstance(a, torch.nn.Parameter) else torch.nn.Parameter(a, requires_grad=False)
        self.lora_b = b if isinstance(b, torch.nn.Parameter) else torch.nn.Parameter(b, requires_grad=False)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.lora_a.requires_grad or self.lora_b.requires_grad):
            # Training: in float32 (bf16 rounding would swallow the small steps the matrices take); the gradient
            # reaches the layers below through a frozen kernel that has no backward of its own.
            if x.requires_grad and not isinstance(self.base, torch.nn.Linear):
                y = _ThroughFrozen.apply(x, self.base)
            else:
                y = self.base(x)
            d = (x.float() @ self.lora_a.T) @ self.lora_b.T
            return y + (self.scale * d).to(y.dtype)
        # Inference: in the activations' dtype. The engine keeps a loaded adapter in that dtype (``load(dtype=)``),
        # so nothing is cast here; the scale goes in as ``addmm_``'s alpha rather than into a scaled copy of B.
        a, b = self._matrices(x.dtype)
        y = self.base(x)
        if not y.is_contiguous():
            return y + self.scale * ((x @ a.T) @ b.T)
        # Added into the projection's own fresh output: a second output-sized tensor per projection (13 MiB for
        # an MLP projection of a 1,353-token pass) was mapped and unmapped at every call under the engine's
        # allocation policy.
        y.view(-1, y.shape[-1]).addmm_((x @ a.T).reshape(-1, a.shape[0]), b.T, alpha=self.scale)
        return y

    def _matrices(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``lora_a`` and ``lora_b`` in ``dtype``: themselves when they are in it (this path records no graph:
        gradients are off or nothing requires one), else copies cast again only after the matrices change."""
        if self.lora_a.dtype == dtype and self.lora_b.dtype == dtype:
            return self.lora_a, self.lora_b
        key = (dtype, self.lora_a._version, self.lora_b._version)
        if self.__dict__.get("_cast_key") != key:
            with torch.no_grad():
                self.__dict__["_cast"] = (self.lora_a.detach().to(dtype), self.lora_b.detach().to(dtype))
            self.__dict__["_cast_key"] = key
        return self.__dict__["_cast"]


class _ThroughFrozen(torch.autograd.Function):
    """``base(x)`` for a frozen projection whose kernel has no backward of its own (the packed bf16 oneDNN op, a
    weight-only quantised matmul): the gradient to ``x`` is ``grad_y @ W`` with ``W`` its dense weight, in the
    gradient's dtype (bf16 where the model runs in bf16: a float32 weight made every step a float32 GEMM, which
    native bf16 matrix units do not run; training through all 24 layers took 0.47 s an item that way)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, base: torch.nn.Module) -> torch.Tensor:
        ctx.base = base
        with torch.no_grad():
            return base(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad @ dense_weight(ctx.base, grad.dtype), None


def dense_weight(module: Any, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A projection's weight as a plain [out, in] tensor in ``dtype`` (training only: inference never needs it)."""
    if hasattr(module, "dequantized"):  # the weight-only int8 / int4 layers
        return module.dequantized(dtype)
    w = getattr(module, "weight", None)
    w = w() if callable(w) else w
    if hasattr(module, "dequantize") and not isinstance(w, torch.Tensor):
        w = module.dequantize()
    if not isinstance(w, torch.Tensor):
        raise AdapterError(f"cannot train through {type(module).__name__}: it exposes no dense weight (train with "
                           "ALLINONE_QUANTIZE=none)")
    return (w.dequantize() if w.is_quantized else w).to(dtype)


def linear_like(module: Any) -> bool:
    return isinstance(getattr(module, "in_features", None), int) and isinstance(getattr(module, "out_features", None),
                                                                                  int)


def target_names(model: torch.nn.Module, layers: tuple[int, ...], projections: tuple[str, ...]) -> list[str]:
    """The dotted names of the linear-like projections ``projections`` of decoder layers ``layers`` (0-based)."""
    out = []
    for name, mod in model.named_modules():
        m = _LAYER.search(name + ".")
        if m and int(m.group(1)) in layers and name.rpartition(".")[2] in projections and linear_like(mod):
            out.append(name)
    return out


@dataclass
class SentimentAdapter:
    """The low-rank matrices of each adapted projection, by module name, and where they are put in a model."""

    a: dict[str, torch.Tensor]  # name -> [r, in]
    b: dict[str, torch.Tensor]  # name -> [out, r]
    rank: int
    alpha: float
    meta: dict[str, Any] = field(default_factory=dict)
    label_offset: float = 0.0  # added to the positive label's logit (the trainer fits it on the dev messages)
    _model: torch.nn.Module | None = field(default=None, repr=False)
    # (parent module, attribute, wrapper) of each adapted projection, found once at attach
    _slots: list[tuple[torch.nn.Module, str, LoRA]] = field(default_factory=list, repr=False)
    _depth: int = field(default=0, repr=False)
    _file_fingerprint: str | None = field(default=None, repr=False)  # of the float32 file, when kept in bf16

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def names(self) -> list[str]:
        return sorted(self.a)

    @property
    def layers(self) -> tuple[int, ...]:
        """The decoder layers (0-based) it adapts."""
        return tuple(sorted({int(m.group(1)) for n in self.a if (m := _LAYER.search(n + "."))}))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.a.values(), *self.b.values()))

    @property
    def fingerprint(self) -> str:
        """A short hash of the matrices: a head trained on this adapter's states records it. Of the file's float32
        matrices for an adapter loaded into another dtype (the same adapter, whatever the engine keeps it in)."""
        if self._file_fingerprint is not None:
            return self._file_fingerprint
        h = hashlib.sha256(f"{self.rank}/{self.alpha}".encode())
        if self.label_offset:  # the logits a head may read move with it (an adapter without one keeps its hash)
            h.update(f"offset {self.label_offset!r}".encode())
        for n in self.names:
            h.update(n.encode())
            h.update(self.a[n].detach().float().contiguous().numpy().tobytes())
            h.update(self.b[n].detach().float().contiguous().numpy().tobytes())
        return h.hexdigest()[:12]

    # ---------------------------------------------------------------------------------------- making one
    @classmethod
    def create(cls, model: torch.nn.Module, layers: tuple[int, ...], projections: tuple[str, ...] = ATTENTION + MLP,
               rank: int = 8, alpha: float = 16.0, seed: int = 0, meta: dict[str, Any] | None = None
               ) -> SentimentAdapter:
        """A fresh, trainable adapter for ``model``: A random (seeded), B zero, so it starts as the model itself."""
        names = target_names(model, layers, projections)
        if not names:
            raise AdapterError(f"no projection named {projections} in layers {layers} of this model")
        gen = torch.Generator().manual_seed(seed)
        a, b = {}, {}
        for n in names:
            mod = model.get_submodule(n)
            a[n] = torch.nn.Parameter(torch.randn(rank, mod.in_features, generator=gen) / mod.in_features ** 0.5)
            b[n] = torch.nn.Parameter(torch.zeros(mod.out_features, rank))
        return cls(a=a, b=b, rank=rank, alpha=alpha, meta=dict(meta or {}))

    def parameters(self) -> list[torch.Tensor]:
        """The trainable tensors (the wrappers share them: training them trains what ``active`` puts in)."""
        return [t for n in self.names for t in (self.a[n], self.b[n])]

    # ---------------------------------------------------------------------------------------- in a model
    def attach(self, model: torch.nn.Module) -> SentimentAdapter:
        """Bind to ``model`` (nothing changes in it until :meth:`active`); refuses modules that do not fit."""
        slots = []
        for n in self.names:
            try:
                base = model.get_submodule(n)
            except AttributeError:
                raise AdapterError(f"the sentiment adapter adapts {n}, which the loaded model does not have: {FIX}"
                                   ) from None
            if not linear_like(base):
                raise AdapterError(f"{n} of the loaded model is not a projection the adapter can wrap: {FIX}")
            if (self.a[n].shape[1], self.b[n].shape[0]) != (base.in_features, base.out_features):
                raise AdapterError(
                    f"the sentiment adapter's {n} is {self.a[n].shape[1]} -> {self.b[n].shape[0]} but the loaded "
                    f"model's is {base.in_features} -> {base.out_features}: {FIX}")
            # Where each wrapper goes, found once: ``active`` swaps 2 x 168 modules around every sentiment pass, and
            # finding each parent by name and going through ``Module.__setattr__`` took ~3 ms of a ~270 ms message.
            slots.append((_parent(model, n), n.rpartition(".")[2], LoRA(base, self.a[n], self.b[n], self.scale)))
        self._model, self._slots = model, slots
        return self

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """The adapter in the model for the block (re-entrant); the original modules back in place afterwards."""
        if self._model is None:
            raise AdapterError("the sentiment adapter is not attached to a model")
        if self._depth == 0:
            for parent, child, w in self._slots:
                parent._modules[child] = w  # the slot exists (attach checked it): no __setattr__ bookkeeping
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                for parent, child, w in self._slots:
                    parent._modules[child] = w.base

    # ---------------------------------------------------------------------------------------- checks
    def check_model(self, *, identity: ModelIdentity, prompt: str) -> None:
        """Refuse an adapter trained on another model or under another sentiment prompt (shapes: :meth:`attach`)."""
        trained_on = self.meta.get("model")
        if not (isinstance(trained_on, dict) and trained_on.get("fingerprint")):
            raise AdapterError(f"the sentiment adapter records no model identity: {FIX}")
        name = trained_on.get("name", "an unnamed model")
        if trained_on["fingerprint"] != identity.fingerprint:
            raise AdapterError(
                f"the sentiment adapter was trained on {name} [{trained_on['fingerprint']}] but the loaded model is "
                f"{identity.name} [{identity.fingerprint}]: {FIX}")
        if self.meta.get("prompt") != prompt:
            raise AdapterError(
                f"the sentiment adapter was trained under the sentiment prompt {self.meta.get('prompt')!r} but this "
                f"engine's prompt is {prompt!r}: {FIX}")

    # ---------------------------------------------------------------------------------------- files
    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for n in self.names:
            tensors[f"{n}.lora_a"] = self.a[n].detach().float().contiguous()
            tensors[f"{n}.lora_b"] = self.b[n].detach().float().contiguous()
        metadata = {"format": FORMAT, "rank": str(self.rank), "alpha": str(self.alpha),
                    "label_offset": repr(float(self.label_offset)), "meta": json.dumps(self.meta)}
        # Written beside and renamed over: a process killed mid-write (a long training run) leaves the old file.
        part = path.with_name(path.name + ".part")
        save_file(tensors, str(part), metadata=metadata)
        os.replace(part, path)
        return path

    @classmethod
    def load(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> SentimentAdapter:
        """The adapter in ``path``, its matrices in ``dtype``: the engine asks for the dtype its activations run in,
        so that the matrices are held once, in the form the forward pass uses (half the bytes in bf16)."""
        from safetensors import safe_open

        path = Path(path).expanduser()
        if not path.is_file():
            raise AdapterError(f"ALLINONE_SENTIMENT_ADAPTER names no file: {path} "
                               "(train one: python -m worker.train_adapter)")
        try:
            with safe_open(str(path), framework="pt") as f:
                md = f.metadata() or {}
                t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        except Exception as e:
            raise AdapterError(f"{path} is not a sentiment adapter file: {type(e).__name__}: {e}") from e
        if md.get("format") != FORMAT:
            raise AdapterError(f"{path} is not a sentiment adapter file (format {md.get('format')!r})")
        a = {k[: -len(".lora_a")]: v.float() for k, v in t.items() if k.endswith(".lora_a")}
        b = {k[: -len(".lora_b")]: v.float() for k, v in t.items() if k.endswith(".lora_b")}
        rank = int(md["rank"])
        if not a or set(a) != set(b) or any(a[n].shape[0] != rank or b[n].shape[1] != rank for n in a):
            raise AdapterError(f"{path}: its matrices do not pair up at rank {rank}")
        try:
            offset = float(md.get("label_offset", "0"))
        except ValueError:
            raise AdapterError(f"{path}: its label offset {md['label_offset']!r} is not a number") from None
        if not math.isfinite(offset):
            raise AdapterError(f"{path}: its label offset is {offset}")
        adapter = cls(a=a, b=b, rank=rank, alpha=float(md["alpha"]), meta=json.loads(md.get("meta", "{}")),
                      label_offset=offset)
        if dtype != torch.float32:
            adapter._file_fingerprint = adapter.fingerprint
        adapter.a = {n: t.to(dtype) for n, t in a.items()}
        # B [out, r] is held as the transpose of a contiguous [r, out]: the forward pass multiplies by B^T, and a
        # contiguous right operand made the rank-r product into a 4,864-wide output ~10 % faster (oneDNN, bf16).
        adapter.b = {n: t.to(dtype).T.contiguous().T for n, t in b.items()}
        return adapter


def _parent(model: torch.nn.Module, name: str) -> torch.nn.Module:
    parent = name.rpartition(".")[0]
    return model.get_submodule(parent) if parent else model
