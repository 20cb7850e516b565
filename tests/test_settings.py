from __future__ import annotations

import pytest
from pydantic import ValidationError

from worker.settings import Settings, redact_url


def test_defaults_match_the_product():
    s = Settings()
    assert s.redis_url == "redis://127.0.0.1:6379/0"
    assert s.model == "Qwen/Qwen1.5-0.5B-Chat"
    assert s.live_queue != s.bulk_queue
    # the redelivery timeout must outlast the longest task, or a slow reply would run twice
    assert s.visibility_timeout_seconds > s.reply_timeout_seconds
    # a crashed worker's work is back within the heartbeat TTL, long before Redis would redeliver it, and a reply
    # waiting for an earlier turn waits longer than that turn's recovery and its longest task
    assert s.heartbeat_ttl_seconds + 1 < s.visibility_timeout_seconds
    assert s.order_wait_seconds > s.heartbeat_ttl_seconds + 1 + s.reply_timeout_seconds


def test_every_field_is_described():
    missing = [name for name, f in Settings.model_fields.items() if not f.description]
    assert missing == []


def test_environment_overrides_with_prefix(monkeypatch):
    monkeypatch.setenv("ALLINONE_REDIS_URL", "rediss://:pw@redis.example:6380/2")
    monkeypatch.setenv("ALLINONE_MAX_NEW_TOKENS", "17")
    monkeypatch.setenv("ALLINONE_DO_SAMPLE", "false")
    s = Settings()
    assert s.redis_url.startswith("rediss://")
    assert s.max_new_tokens == 17 and s.do_sample is False


@pytest.mark.parametrize(
    "field,value",
    [("redis_url", "http://localhost"), ("max_new_tokens", 0), ("dtype", "int4"), ("top_p", 1.5), ("threads", 0),
     ("sentiment_batch_tokens", 8), ("sentiment_batch_tokens", -1)],
)
def test_bad_values_are_refused_with_the_field_named(field, value):
    with pytest.raises(ValidationError) as e:
        Settings(**{field: value})
    assert field in str(e.value)


def test_dtype_auto_resolves_to_a_concrete_dtype():
    assert Settings(dtype="auto").resolved_dtype() in ("float32", "bfloat16")
    assert Settings(dtype="float32").resolved_dtype() == "float32"


def test_a_passs_token_budget_holds_the_same_activation_bytes_in_either_dtype():
    # Unset: twice the tokens where activations take half the bytes
    assert Settings().resolved_batch_tokens("float32") == 1024
    assert Settings().resolved_batch_tokens("bfloat16") == 2048
    # Set: the user's number whatever the dtype
    assert Settings(sentiment_batch_tokens=3000).resolved_batch_tokens("float32") == 3000
    assert Settings(sentiment_batch_tokens=16).resolved_batch_tokens("bfloat16") == 16


def test_redact_url_hides_the_password():
    assert redact_url("redis://:s3cret@host:6379/0") == "redis://:***@host:6379/0"
    assert "s3cret" not in redact_url("rediss://user:s3cret@host:6380/1")
    assert redact_url("redis://host:6379/0") == "redis://host:6379/0"
