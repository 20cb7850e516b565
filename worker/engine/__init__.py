"""The engine: the one model of the worker, its lifecycle, and the two jobs it does.

Lifecycle: ``Engine(settings)`` is cheap; ``load()`` runs once per worker process (loads weights, builds the cached
sentiment prefix); then ``classify(texts)`` and ``reply(history, text)`` as often as needed.

Sentiment in one forward pass: the sentiment prompt's fixed part (instruction and few-shot turns) is run once at
load and its key/value cache kept; a message runs only its own tokens on top of a copy of that cache, and we read the
final hidden state at its last token, then the LM-head rows of the two label words only (two dot products instead of
a 150k-vocabulary projection). Many messages go in one right-padded batch; right padding keeps every real token's
position equal to the unbatched one, so batched, cached and plain scores agree.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from worker import prompts
from worker.errors import ModelLoadError
from worker.schemas import Sentiment
from worker.settings import Settings, cpu_has_native_bf16

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadReport:
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

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Scores:
    """Raw sentiment scores of a batch: the two label logits and the hidden state they were read from."""

    label_logits: torch.Tensor  # [B, 2] (positive, negative)
    hidden: torch.Tensor  # [B, H] final hidden state at each message's last token
    # {n: [B, H]}: the residual stream after decoder layer n at the last token, for the layers a head reads
    layers: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def p_positive(self) -> torch.Tensor:
        return torch.softmax(self.label_logits.float(), dim=-1)[:, 0]


@dataclass
class Reply:
    text: str
    new_tokens: int
    prompt_tokens: int
    history_turns: int
    seconds: float
    timed_out: bool = False


# What one more forward pass costs beyond its tokens (cache copy, per-layer call overhead), in padded tokens.
BATCH_OVERHEAD_TOKENS = 32


def plan_batches(lengths: list[int], max_batch: int, overhead: int = BATCH_OVERHEAD_TOKENS) -> list[tuple[int, int]]:
    """Cut a list of token lengths, sorted ascending, into batches of at most ``max_batch``: ``[(start, end)]``.

    A batch computes ``size x longest`` token positions (padding included). The cuts minimise the sum of that over
    the batches plus ``overhead`` per batch (dynamic programming, O(n x max_batch)): a batch whose lengths jump
    (a bulk task's 32 messages, sorted by bytes by the producer, can hold 40 tokens and 120) is split where they
    jump, and a run of similar lengths stays one full batch."""
    n = len(lengths)
    best = [0] * (n + 1)
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        best[j] = 2**62
        for i in range(max(0, j - max_batch), j):
            cost = best[i] + (j - i) * lengths[j - 1] + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    out, j = [], n
    while j > 0:
        out.append((cut[j], j))
        j = cut[j]
    return out[::-1]


def rss_bytes() -> int:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # pragma: no cover - psutil missing
        return 0


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


def _gguf_dequantize() -> dict[str, Any]:
    """Ask for plain dense weights: newer transformers keep GGUF blocks packed, which cannot be saved to the cache
    and run through a float32 kernel that casts every bf16 matmul."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always dequantise
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


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


class Engine:
    """Owns the tokenizer and the model. Not thread-safe: one worker process, one task at a time."""

    def __init__(self, settings: Settings, few_shot: tuple[tuple[str, str], ...] | None = None) -> None:
        self.settings = settings
        self.few_shot = prompts.FEW_SHOT if few_shot is None else few_shot
        self.tokenizer: Any = None
        self.model: Any = None
        self.report: LoadReport | None = None
        self.head: Any = None
        self._prefix_ids: list[int] = []
        self._suffix_ids: list[int] = []
        self._prefix_cache: Any = None
        self._label_ids: tuple[int, int] = (0, 0)
        self._label_weights: torch.Tensor | None = None
        self._specials: list[str] = []
        self._stop_ids: list[int] = []
        self._cache_kw = "cache"
        self._label_bias: torch.Tensor | None = None

    # ------------------------------------------------------------------------------------------- lifecycle
    @property
    def loaded(self) -> bool:
        return self.model is not None

    @property
    def model_id(self) -> str:
        return self.settings.model

    def load(self) -> LoadReport:
        """Load tokenizer and weights once, then prepare the sentiment prefix. Logs before and after."""
        if self.report is not None:
            return self.report
        s = self.settings
        # Threads before anything runs in parallel: interop threads can only be set once per process.
        torch.set_num_threads(s.threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:
            pass
        # Dynamic int8 kernels take float32 activations: quantise from float32 weights, whatever dtype says.
        dtype = "float32" if s.quantize == "int8" else s.resolved_dtype()
        log.info("loading model %s (dtype %s, %d threads, quantize %s)", s.model, dtype, s.threads, s.quantize)
        t0 = time.perf_counter()
        from_cache = False
        try:
            path = Path(s.model).expanduser()
            if path.suffix == ".gguf":
                if not path.is_file():
                    raise ModelLoadError(f"ALLINONE_MODEL names a GGUF file that does not exist: {path}")
                source, from_cache = self._load_gguf(path, dtype)
            else:
                source = str(path) if path.exists() else s.model
                self._load_pretrained(source, dtype)
        except ModelLoadError:
            raise
        except Exception as e:
            raise ModelLoadError(
                f"could not load model {s.model!r}: {type(e).__name__}: {e}. ALLINONE_MODEL takes a hub id "
                "(needs network access or a filled HF cache), a local model folder, or a .gguf file."
            ) from e

        self.model.eval()
        self.model.requires_grad_(False)
        if s.quantize == "int8":
            self._quantize_int8()
        elif dtype == "bfloat16" and cpu_has_native_bf16():
            log.info("packed %d bf16 Linear layers for oneDNN", pack_bf16_linears(self.model))
        self._prepare()
        if s.sentiment_head is not None:
            from worker.engine.head import SentimentHead

            self.head = SentimentHead.load(s.sentiment_head)
            self.head.check_model(self.hidden_size, self.num_layers)
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        weights += sum(b.numel() * b.element_size() for b in self.model.buffers())
        for m in self.model.modules():
            w = getattr(m, "weight", None)
            if callable(w):  # a dynamically quantised Linear: weight() is int8 and no parameter
                weights += w().numel() * w().element_size()
        self.report = LoadReport(
            model=s.model,
            source=source,
            dtype=str(next(self.model.parameters()).dtype).replace("torch.", ""),
            threads=torch.get_num_threads(),
            seconds=round(time.perf_counter() - t0, 3),
            rss_bytes=rss_bytes(),
            weights_bytes=int(weights),
            from_cache=from_cache,
            prefix_tokens=len(self._prefix_ids),
            quantize=s.quantize,
        )
        log.info(
            "model loaded: %s from %s in %.1f s (%s, %d threads, RSS %.0f MiB, weights %.0f MiB, %s)",
            s.model,
            source,
            self.report.seconds,
            self.report.dtype,
            self.report.threads,
            self.report.rss_bytes / 2**20,
            self.report.weights_bytes / 2**20,
            "converted-weights cache" if from_cache else "no cache",
        )
        return self.report

    def _load_pretrained(self, source: str, dtype: str, **kw: Any) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        trc = self.settings.trust_remote_code
        tok_kw = {k: v for k, v in kw.items() if k != "quantization_config"}  # a model option only
        self.tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trc, **tok_kw)
        self.model = AutoModelForCausalLM.from_pretrained(
            source, dtype=_DTYPES[dtype], trust_remote_code=trc, low_cpu_mem_usage=True, **kw
        )

    def _load_gguf(self, gguf: Path, dtype: str) -> tuple[str, bool]:
        """Dequantising a GGUF takes a minute; we do it once and keep safetensors in the cache."""
        cached = gguf_cache_dir(gguf, self.settings.cache_dir.expanduser(), dtype)
        if (cached / "config.json").is_file():
            self._load_pretrained(str(cached), dtype)
            return str(cached), True
        log.info("converting %s once (dequantise to %s); next start loads %s", gguf.name, dtype, cached)
        self._load_pretrained(str(gguf.parent), dtype, gguf_file=gguf.name, **_gguf_dequantize())
        tmp = cached.with_name(cached.name + f".tmp-{os.getpid()}")
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            self.model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            # rename is atomic: a worker killed mid-save leaves a .tmp folder, never a half cache
            os.replace(tmp, cached)
        except OSError as e:
            log.warning("could not cache converted weights in %s (%s); the next start converts again", cached, e)
            return str(gguf), False
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        # Run from the cache, as every later start will: memory-mapped weights, the same numbers and memory.
        self.model = None
        self._load_pretrained(str(cached), dtype)
        return str(gguf), False

    def _quantize_int8(self) -> None:
        from torch.ao.quantization import quantize_dynamic

        # Dynamic int8 on Linear layers only; embeddings and norms stay in float.
        self.model = quantize_dynamic(self.model, {torch.nn.Linear}, dtype=torch.qint8)

    def _prepare(self) -> None:
        """Everything a message's scoring reuses: label rows, prompt prefix and suffix, prefix KV cache."""
        tok = self.tokenizer
        if not getattr(tok, "chat_template", None):
            log.warning("tokenizer has no chat template; using ChatML")
            tok.chat_template = prompts.CHATML_TEMPLATE
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        self._specials = [str(t) for t in tok.all_special_tokens] + [
            str(t.content) for t in getattr(tok, "added_tokens_decoder", {}).values() if getattr(t, "special", False)
        ]
        self._label_ids = tuple(self._first_token(w) for w in prompts.LABEL_WORDS)  # type: ignore[assignment]
        if self._label_ids[0] == self._label_ids[1]:
            raise ModelLoadError(f"the label words {prompts.LABEL_WORDS} start with the same token")
        out_emb = self.model.get_output_embeddings()
        # A dynamically quantised Linear exposes weight() and bias() as methods returning its (int8) tensors.
        w = out_emb.weight() if callable(out_emb.weight) else out_emb.weight
        if w.is_quantized:
            w = w.dequantize()
        b = getattr(out_emb, "bias", None)
        b = b() if callable(b) else b
        self._label_weights = w[list(self._label_ids)].detach().float().clone()  # [2, H]
        self._label_bias = b[list(self._label_ids)].detach().float().clone() if b is not None else None

        # Split the rendered sentiment prompt around a marker: what comes before is the same for every message.
        marker = "\x00MESSAGE\x00"
        rendered = tok.apply_chat_template(
            prompts.sentiment_messages(marker, self.few_shot), tokenize=False, add_generation_prompt=True
        )
        head, tail = rendered.split(marker)
        self._prefix_ids = tok(head, add_special_tokens=False)["input_ids"]
        self._suffix_ids = tok(tail, add_special_tokens=False)["input_ids"]
        # transformers 5 renamed past_key_values to cache; speak whichever this version knows.
        base = self._decoder()
        self._cache_kw = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
        with torch.inference_mode():
            out = base(input_ids=torch.tensor([self._prefix_ids]), use_cache=True)
        self._prefix_cache = getattr(out, self._cache_kw)

        eos = tok.eos_token_id
        im_end = tok.convert_tokens_to_ids("<|im_end|>")
        self._stop_ids = sorted({i for i in (eos, im_end) if isinstance(i, int) and i >= 0 and i != tok.unk_token_id})

    def _decoder(self) -> Any:
        """The transformer body without the LM head (its last hidden state is already normed)."""
        return self.model.get_decoder() if hasattr(self.model, "get_decoder") else self.model.model

    def _first_token(self, word: str) -> int:
        ids = self.tokenizer(word, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ModelLoadError(f"tokenizer produced no token for label word {word!r}")
        return int(ids[0])

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        assert self._label_weights is not None
        return int(self._label_weights.shape[1])

    def _require_loaded(self) -> None:
        if not self.loaded:
            raise RuntimeError("Engine.load() must run before classify() or reply()")

    # ------------------------------------------------------------------------------------------- sentiment
    def message_ids(self, text: str) -> list[int]:
        """A message's own tokens in the sentiment prompt: its text (cut to the token budget) and the suffix."""
        # split_special_tokens: a user's "<|im_end|>" is plain text here, never a turn boundary.
        ids = self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        return ids[: self.settings.sentiment_max_tokens] + self._suffix_ids

    @property
    def feature_layers(self) -> tuple[int, ...]:
        """The inner layers whose states the loaded head reads (none without a head)."""
        return self.head.layers if self.head is not None else ()

    def score(self, texts: list[str], batch_size: int | None = None, layers: tuple[int, ...] | None = None) -> Scores:
        """Label logits and hidden states of many messages, batched, on the cached prefix.

        ``layers``: inner layers to return the last-token state of (default: those the loaded head reads)."""
        self._require_loaded()
        bs = batch_size or self.settings.sentiment_batch_size
        layers = self.feature_layers if layers is None else tuple(layers)
        for n in layers:
            if not 1 <= n <= self.num_layers:
                raise ValueError(f"layer {n} is not a layer of this model (1..{self.num_layers})")
        encoded = [self.message_ids(t) for t in texts]
        # Length bucketing: sorting by length keeps padding (wasted compute) small inside each batch, and the
        # cuts between batches are placed where lengths jump (plan_batches).
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        logits = torch.empty(len(texts), 2)
        hidden = torch.empty(len(texts), self.hidden_size)
        inner = {n: torch.empty(len(texts), self.hidden_size) for n in layers}
        for start, end in plan_batches([len(encoded[i]) for i in order], bs):
            idx = order[start:end]
            lg, hd, states = self._score_batch([encoded[i] for i in idx], layers)
            logits[idx] = lg
            hidden[idx] = hd
            for n in layers:
                inner[n][idx] = states[n]
        return Scores(label_logits=logits, hidden=hidden, layers=inner)

    def forward_on_prefix(self, batch: list[list[int]], **kw: Any) -> tuple[Any, torch.Tensor]:
        """Run message token lists, right-padded into one batch, on top of the cached prompt prefix.

        Returns the decoder's output and the attention mask ([n, prefix + longest]); ``kw`` goes to the decoder
        (e.g. ``output_hidden_states=True`` for experiments on other layers)."""
        n, longest, plen = len(batch), max(len(b) for b in batch), len(self._prefix_ids)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((n, longest), pad, dtype=torch.long)
        mask = torch.zeros((n, plen + longest), dtype=torch.long)
        mask[:, :plen] = 1
        for row, b in enumerate(batch):
            ids[row, : len(b)] = torch.tensor(b)
            mask[row, plen : plen + len(b)] = 1
        # The forward pass appends to the cache it is given: hand it a copy, widened to the batch.
        cache = copy.deepcopy(self._prefix_cache)
        if n > 1:
            cache.batch_repeat_interleave(n)
        with torch.inference_mode():
            out = self._decoder()(input_ids=ids, attention_mask=mask, use_cache=True, **{self._cache_kw: cache}, **kw)
        return out, mask

    def _score_batch(
        self, batch: list[list[int]], layers: tuple[int, ...] = ()
    ) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]:
        n = len(batch)
        # Inner states cost nothing extra to compute: the decoder only keeps references to them.
        out, _ = self.forward_on_prefix(batch, **({"output_hidden_states": True} if layers else {}))
        with torch.inference_mode():
            last = torch.tensor([len(b) - 1 for b in batch])
            rows = torch.arange(n)
            hidden = out.last_hidden_state[rows, last].float()  # [n, H], after the final norm
            # hidden_states[0] is the embedding output, [k] the output of decoder layer k
            states = {k: out.hidden_states[k][rows, last].float() for k in layers}
        return self._label_logits(hidden), hidden, states

    def _label_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        assert self._label_weights is not None
        lg = hidden @ self._label_weights.T
        if self._label_bias is not None:
            lg = lg + self._label_bias
        return lg

    def score_plain(self, text: str) -> Scores:
        """The reference: the whole prompt in one ordinary forward pass, full LM head, no cache, no batch.

        Used by tests and the benchmark to prove the fast path computes the same thing."""
        self._require_loaded()
        ids = torch.tensor([self._prefix_ids + self.message_ids(text)])
        with torch.inference_mode():
            out = self.model(input_ids=ids, output_hidden_states=True)
        logits = out.logits[0, -1].float()
        return Scores(
            label_logits=logits[list(self._label_ids)].unsqueeze(0),
            hidden=out.hidden_states[-1][0, -1:].float(),
            layers={k: out.hidden_states[k][0, -1:].float() for k in range(1, self.num_layers + 1)},
        )

    def classify(self, texts: list[str], batch_size: int | None = None) -> list[Sentiment]:
        """Positive or negative, with a confidence, for each text (batched on the cached prefix)."""
        if not texts:
            return []
        return self.sentiments(self.score(texts, batch_size=batch_size))

    def prompt_p_positive(self, scores: Scores) -> torch.Tensor:
        """P(positive) from the two label logits alone (the prompt, without a head)."""
        return scores.p_positive

    def sentiments(self, scores: Scores) -> list[Sentiment]:
        """Labels and confidences from scores: the head's probability when one is loaded, else the prompt's."""
        if self.head is not None:
            p_pos = self.head.p_positive(scores)
            method = "prompt+head"
        else:
            p_pos = self.prompt_p_positive(scores)
            method = "prompt"
        return [Sentiment.from_p_positive(p, method) for p in p_pos.tolist()]

    # ------------------------------------------------------------------------------------------- replies
    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def fit_history(self, history: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """The most recent earlier turns whose tokens fit the history budget, oldest first."""
        budget, kept = self.settings.history_tokens, []
        for user, assistant in reversed(history):
            cost = self.count_tokens(user) + self.count_tokens(assistant) + 8  # + role markers
            if cost > budget:
                break
            budget -= cost
            kept.append((user, assistant))
        return kept[::-1]

    def reply_prompt_ids(self, history: list[tuple[str, str]], text: str) -> tuple[torch.Tensor, int]:
        kept = self.fit_history(history)
        n = lambda t: prompts.neutralize(t, self._specials)  # noqa: E731
        msgs = prompts.reply_messages(
            self.settings.system_prompt, [(n(u), n(a)) for u, a in kept], n(text)
        )
        enc = self.tokenizer.apply_chat_template(
            msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        return enc["input_ids"], len(kept)

    def reply(self, history: list[tuple[str, str]], text: str) -> Reply:
        """A chat reply to ``text`` that sees the earlier (user, reply) turns that fit the history budget."""
        self._require_loaded()
        s = self.settings
        ids, kept = self.reply_prompt_ids(history, text)
        if s.seed is not None:
            torch.manual_seed(s.seed)
        gen: dict[str, Any] = dict(
            max_new_tokens=s.max_new_tokens,
            do_sample=s.do_sample,
            repetition_penalty=s.repetition_penalty,
            eos_token_id=self._stop_ids or None,
            pad_token_id=self.tokenizer.pad_token_id,
            # A wall-clock bound enforced inside generate(): it works under the solo pool, where Celery's own
            # time limits are not enforced.
            max_time=s.reply_timeout_seconds,
        )
        if s.do_sample:
            gen.update(temperature=s.temperature, top_p=s.top_p)
        else:
            gen.update(temperature=None, top_p=None, top_k=None)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **gen)
        seconds = time.perf_counter() - t0
        new = out[0, ids.shape[1] :]
        stopped = len(new) > 0 and int(new[-1]) in self._stop_ids
        text_out = self.tokenizer.decode(new, skip_special_tokens=True).strip()
        timed_out = (not stopped) and len(new) < s.max_new_tokens and seconds >= s.reply_timeout_seconds
        return Reply(
            text=text_out,
            new_tokens=int(len(new)),
            prompt_tokens=int(ids.shape[1]),
            history_turns=kept,
            seconds=seconds,
            timed_out=timed_out,
        )
