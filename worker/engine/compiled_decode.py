"""The reply's decode step through ``torch.compile`` (``ALLINONE_COMPILE_DECODE``).

A one-token decode step of a 0.5B model is ~170 small quantised matmuls and about a thousand element-wise ops
(RMSNorm, rotary, SiLU x up, residual adds), each a Python call into torch: on two cores that overhead was a third of
a step beside the weight reads. Inductor traces the Python away and fuses the element-wise ops into generated C++
loops; the quantised kernels stay torch's own. The figures are in ``docs/benchmark.md``.

Only one-token steps are compiled (generate()'s decode, batched or not): prompts, sentiment passes and adapter
training keep their eager path, whose shapes vary far more and whose cost is the matmuls. Shapes are dynamic, so the
growing KV cache does not recompile each step; a single row and several rows are two graphs (torch specialises
size 1), both compiled at load (:func:`warm_up`) so no reply waits for a compiler.

Compiling needs a C++ compiler (Inductor's CPU backend) and takes about a minute on two cores the first time (its
cache, in ``TORCHINDUCTOR_CACHE_DIR``, makes later starts shorter). Where anything fails the engine logs why and
decodes eagerly: slower, never wrong.
"""

from __future__ import annotations

import functools
import logging
import shutil
import sysconfig
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)


class DecodeStep:
    """A model's ``forward`` that sends one-token inference steps to its compiled form and every other call to
    the eager one.

    It carries the wrapped forward's signature (``__wrapped__``): ``generate()`` reads ``inspect.signature(
    model.forward)`` to decide what to pass. Behind a bare ``(*args, **kwargs)`` it passed no ``position_ids`` (a
    left-padded row then took the padded column as its position, which a row's cache computed alone does not
    match) and no ``logits_to_keep`` (a prompt's logits over the whole vocabulary at every position)."""

    def __init__(self, forward: Callable[..., Any]) -> None:
        functools.update_wrapper(self, forward)
        self.eager = forward
        self.compiled = torch.compile(forward, dynamic=True)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        ids = kwargs.get("input_ids")
        if ids is not None and ids.dim() == 2 and ids.shape[1] == 1 and not torch.is_grad_enabled():
            return self.compiled(*args, **kwargs)
        return self.eager(*args, **kwargs)


def compiler() -> str | None:
    """The C++ compiler Inductor would call, or None when there is none on this machine."""
    for name in (sysconfig.get_config_var("CXX") or "", "g++", "c++", "clang++"):
        found = shutil.which(name.split()[0]) if name else None
        if found:
            return found
    return None


def compile_decode(model: Any) -> bool:
    """Route ``model``'s one-token steps through ``torch.compile``; False (nothing changed) without a compiler."""
    if is_compiled(model):
        return True
    if compiler() is None:
        log.warning("ALLINONE_COMPILE_DECODE: no C++ compiler on this machine; decoding eagerly")
        return False
    model.forward = DecodeStep(model.forward)
    return True


def uncompile(model: Any) -> None:
    """Back to the eager forward (the instance attribute set by :func:`compile_decode` removed)."""
    if is_compiled(model):
        del model.forward


def is_compiled(model: Any) -> bool:
    return isinstance(model.__dict__.get("forward"), DecodeStep)


def warm_up(model: Any, decode: Callable[[], Any]) -> None:
    """Compile both graphs now, by running ``decode`` (a few greedy tokens of one row and of a left-padded batch,
    through the product's own reply path), so no reply pays for it; on any failure the model decodes eagerly from
    here on (logged)."""
    try:
        decode()
    except Exception as exc:  # noqa: BLE001 - any compiler failure: decode eagerly rather than not at all
        log.warning("ALLINONE_COMPILE_DECODE: compiling the decode step failed (%s: %s); decoding eagerly",
                    type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        uncompile(model)
