"""The one settings object. Every knob of the product lives here, read from the environment (prefix ``ALLINONE_``).

``celeryconfig.py``, the worker, the producer and every CLI read this; nothing else reads the environment.
This module must stay importable without torch: the producer imports it.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_threads() -> int:
    # Cores this process may run on (cgroup/affinity aware), not the host's count: oversubscribing two cores
    # with four torch threads halves throughput.
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


class Settings(BaseSettings):
    """Settings of broker, results store, model and prompts. Environment: ``ALLINONE_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="ALLINONE_", env_file=".env", extra="ignore")

    # --- Redis: broker and results store -------------------------------------------------------------------
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Redis URL for both the Celery broker and the results store. "
        "redis://[:password@]host:port/db, rediss:// for TLS (add ?ssl_cert_reqs=required), or unix:///path.sock.",
    )
    key_prefix: str = Field(
        "allinone", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$", description="Prefix of every results-store key."
    )
    result_ttl_seconds: int = Field(
        7 * 24 * 3600, ge=60, description="Conversations and turns expire this long after their last write."
    )
    live_queue: str = Field("live", description="Queue for single messages (web backends); consumed first.")
    bulk_queue: str = Field("bulk", description="Queue for back-processing jobs; consumed when live is empty.")
    heartbeat_ttl_seconds: int = Field(
        15,
        ge=3,
        description="A worker's heartbeat lasts this long; it beats every third of it, also through a long reply. "
        "When it expires (the worker was killed, its machine lost), a live worker puts the task messages it held "
        "back at the head of their queue within a second: a crashed worker's work is back this long after the "
        "crash, plus a second.",
    )
    visibility_timeout_seconds: int = Field(
        600,
        ge=2,
        description="The last resort: a task taken by a worker that died unacknowledged, and that no live worker "
        "put back (see heartbeat_ttl_seconds), is redelivered by Redis after this long. "
        "Must exceed the longest task (reply_timeout_seconds plus a batch of sentiment).",
    )
    order_wait_seconds: float = Field(
        1800.0,
        ge=0,
        description="A reply waits (re-queued with a countdown) up to this long for the earlier turns of its "
        "conversation to finish, so its prompt holds exactly the turns before it. Keep it well above "
        "heartbeat_ttl_seconds plus the longest task: an earlier turn held by a crashed worker comes back only "
        "after that.",
    )
    stale_after_seconds: float = Field(
        60.0,
        ge=0,
        description="A turn submitted one by one that no worker holds, whose queue is empty, and that no task has "
        "touched for this long is re-enqueued by a worker (its message was lost between Redis and a worker that "
        "died before recording it, or its producer died before sending it). 0 turns the sweep off.",
    )
    redis_retry_seconds: float = Field(
        10.0, ge=0, description="The producer retries a Redis that does not answer, with backoff, this long."
    )

    # --- Model ---------------------------------------------------------------------------------------------
    model: str = Field(
        "Qwen/Qwen1.5-0.5B-Chat",
        description="A Hugging Face hub id, a local model folder, or a .gguf file (converted once, then cached).",
    )
    cache_dir: Path = Field(
        Path.home() / ".cache" / "allinone",
        description="Where GGUF models are cached once converted to safetensors, so the next start takes seconds.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Weights dtype. auto: bfloat16 only where the CPU computes it natively (AVX512-BF16 or AMX), "
        "else float32.",
    )
    quantize: Literal["auto", "none", "int8", "int4"] = Field(
        "auto",
        description="Weight-only quantisation of every linear layer and of the embedding table (activations stay "
        "in the dtype). int8: one scale per output channel, accuracy of float32 and several times faster decode; "
        "int4: groups of 32, the LM head too (its two sentiment label rows kept in float32), faster decode "
        "still, within half a point of float32's sentiment accuracy; none: plain weights. auto: int4, or none when "
        "ALLINONE_DTYPE names a dtype (so float32 stays forceable).",
    )
    dequant_rows: int = Field(
        0,
        ge=0,
        le=1 << 16,
        description="From this many rows a call of a quantised layer dequantises its weight and runs one plain "
        "GEMM instead of the packed kernel (sentiment passes; replies always decode on the packed kernels). 0: "
        "timed on this CPU at load (a matrix unit such as AMX moves it from 128 rows down to a few dozen).",
    )
    threads: int = Field(default_factory=_default_threads, ge=1, le=256, description="torch intra-op threads.")
    compile_decode: bool = Field(
        False,
        description="Compile the reply's one-token decode step with torch.compile at load: faster replies (fewer "
        "Python calls, fused element-wise ops), about a minute more to start the first time; needs a C++ compiler "
        "(without one the worker logs it and decodes eagerly).",
    )
    trust_remote_code: bool = Field(False, description="Allow model code from the hub (off: safer).")

    # --- Sentiment -----------------------------------------------------------------------------------------
    sentiment_max_tokens: int = Field(
        128, ge=8, le=4096, description="A message is cut to this many tokens for sentiment (its head is kept)."
    )
    sentiment_batch_size: int = Field(
        64, ge=1, le=512, description="At most this many messages per sentiment forward pass (packed, no padding)."
    )
    sentiment_batch_tokens: int = Field(
        0,
        ge=0,
        le=1 << 20,
        description="At most this many message tokens per sentiment forward pass (a longer lone message still goes "
        "alone): bounds a pass's activation memory. Larger passes spread each layer's dequantisation over more "
        "messages. 0: by the activations' dtype, 2048 in bf16 and 1024 in float32 (the same bytes).",
    )
    sentiment_head: Path | None = Field(
        None, description="A trained sentiment head (python -m worker.train_head); absent: prompt scoring alone."
    )
    sentiment_adapter: Path | None = Field(
        None,
        description="A trained sentiment adapter (python -m worker.train_adapter): low-rank weights on for the "
        "sentiment forward pass only, off for replies; absent: the model as it is.",
    )

    # --- Replies -------------------------------------------------------------------------------------------
    system_prompt: str = Field(
        "You are a helpful, friendly assistant. Answer briefly, in the language of the user.",
        description="System prompt of the chat reply. User text can never replace it.",
    )
    max_new_tokens: int = Field(64, ge=1, le=2048, description="Longest reply, in tokens.")
    do_sample: bool = Field(True, description="Sample replies (true) or decode greedily (false).")
    temperature: float = Field(0.7, gt=0, le=5, description="Sampling temperature.")
    top_p: float = Field(0.8, gt=0, le=1, description="Nucleus sampling mass.")
    repetition_penalty: float = Field(1.05, ge=1, le=3, description="Penalty on repeated tokens.")
    seed: int | None = Field(None, description="Seed for sampling; set it for reproducible replies.")
    history_tokens: int = Field(
        1024, ge=0, le=32768, description="Token budget for the conversation's earlier turns in the reply prompt."
    )
    prompt_cache_mb: int = Field(
        256,
        ge=0,
        le=1 << 20,
        description="Keys and values of recent reply prompts kept in each worker process, in MiB: a conversation's "
        "next turn computes only its new tokens, not its whole history again. A token costs 2 x layers x key/value "
        "heads x head size x the dtype's bytes (12 KiB for a Qwen2-0.5B in bf16, 192 KiB for Qwen1.5-0.5B in "
        "float32). 0: none kept.",
    )
    reply_batch_size: int = Field(
        8,
        ge=1,
        le=64,
        description="Bulk jobs with replies decode up to this many replies together (one per conversation at a "
        "time); a live message waits for one such batch at most. 1: one reply at a time.",
    )
    reply_timeout_seconds: float = Field(
        120.0, gt=0, description="Wall-clock bound of one reply's decoding (enforced in-process: any pool)."
    )

    # --- Events, the web app, metrics ----------------------------------------------------------------------
    token_events: Literal["live", "all", "off"] = Field(
        "live",
        description="Which replies stream `token` events (pieces of the reply as it is written) on their turn's "
        "event stream: live: every turn not on the bulk queue; all: bulk turns too; off: none (the other events "
        "still are).",
    )
    token_event_seconds: float = Field(
        0.2,
        ge=0,
        le=10,
        description="A reply's text is sent as one `token` event at most this often (the first piece at once), so "
        "events cost no decode speed. 0: one event per token.",
    )
    publish_timeout_seconds: float = Field(
        5.0,
        gt=0,
        description="The asyncio producer (the web app) gives up on the broker after this long and answers 503 "
        "(StoreUnavailable); the event loop never waits for it.",
    )
    metrics_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Port of the worker's Prometheus metrics (/metrics; needs the `metrics` extra). Unset or 0: "
        "off.",
    )

    # --- Input ---------------------------------------------------------------------------------------------
    max_message_chars: int = Field(8000, ge=1, description="Longer messages are refused with a clear error.")
    max_id_chars: int = Field(200, ge=8, le=1000, description="Longest conversation or message id.")

    @field_validator("sentiment_batch_tokens")
    @classmethod
    def _check_batch_tokens(cls, v: int) -> int:
        if 0 < v < 16:
            raise ValueError(f"ALLINONE_SENTIMENT_BATCH_TOKENS must be 0 (by dtype) or at least 16 (got {v})")
        return v

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, v: str) -> str:
        if not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(
                f"ALLINONE_REDIS_URL must start with redis://, rediss:// or unix:// (got {v.split('@')[-1]!r})"
            )
        return v

    def resolved_quantize(self) -> str:
        """The quantisation mode to load: ``auto`` is int4 unless a dtype was named explicitly.

        int4 (the LM head too, its label rows kept in float32) is the fastest mode whose sentiment accuracy on the
        1,000-item zh and en test sets is within 0.5 point of float32's (+0.1 / -0.5 on the 0.5B stand-in; int8:
        -0.3 / +0.1), with replies as likely as int8's within a few percent (docs/benchmark.md)."""
        if self.quantize != "auto":
            return self.quantize
        return "int4" if self.dtype == "auto" else "none"

    def resolved_batch_tokens(self, dtype: str) -> int:
        """Message tokens per sentiment pass for activations in ``dtype`` (``float32``, ``bfloat16``...).

        Unset (0), the same activation bytes whatever the dtype: a float32 pass of 2,048 tokens held ~270 MiB above
        the loaded model (its MLP's [tokens, 4864] tensors), which put the worker over twice llama.cpp's memory on
        a CPU without bf16; 1,024 tokens held ~110 MiB less at the same bulk rate (docs/benchmark.md)."""
        if self.sentiment_batch_tokens:
            return self.sentiment_batch_tokens
        return 1024 if dtype == "float32" else 2048

    def resolved_dtype(self) -> str:
        """The dtype to load weights in: ``auto`` resolved against what this CPU computes natively."""
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if cpu_has_native_bf16() else "float32"


def cpu_has_native_bf16() -> bool:
    """True where the CPU has bf16 arithmetic (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()


def redact_url(url: str) -> str:
    """The URL without its password, for logs."""
    if "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0] if ":" in creds else ""
    return f"{scheme}://{user}:***@{host}"


def markdown_table() -> str:
    """Every setting as a Markdown table row (the README's settings section is this output)."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, f in Settings.model_fields.items():
        default = {"threads": "cores available", "cache_dir": "~/.cache/allinone"}.get(name, f.default)
        rows.append(f"| `ALLINONE_{name.upper()}` | `{default}` | {f.description} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
