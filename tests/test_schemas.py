from __future__ import annotations

import pytest

from worker.errors import InvalidMessage
from worker.schemas import Status, Turn, parse_payload, validate_id, validate_text


@pytest.mark.parametrize(
    "value,reason",
    [
        ("", "empty"),
        ("   \n\t", "empty"),
        (None, "must be a string"),
        (42, "must be a string"),
        (["hi"], "must be a string"),
        ("x" * 101, "limit is 100"),
        (b"\xff\xfe bad", "not valid UTF-8"),
        ("bad \ud800 surrogate", "surrogates"),
    ],
)
def test_bad_text_gets_a_clear_reason(value, reason):
    with pytest.raises(InvalidMessage, match=reason):
        validate_text(value, max_chars=100)


def test_good_text_passes_unchanged_and_utf8_bytes_are_decoded():
    assert validate_text("房间很干净 👍", 100) == "房间很干净 👍"
    assert validate_text("很好".encode(), 100) == "很好"
    assert validate_text("x" * 100, 100) == "x" * 100


@pytest.mark.parametrize("value", ["", "a b", "tab\there", "nul\x00", 7, None, "x" * 300])
def test_bad_ids_are_refused(value):
    with pytest.raises(InvalidMessage):
        validate_id(value, "conversation_id", 200)


@pytest.mark.parametrize("value", ["conv-1", "user:42/chat:7", "a@b.example", "会话-1", "x" * 200])
def test_odd_but_printable_ids_pass(value):
    assert validate_id(value, "conversation_id", 200) == value


@pytest.mark.parametrize(
    "raw", ["garbage", None, 3, {"message_id": "m"}, {"message_id": 1, "conversation_id": "c"},
            {"message_id": "m", "conversation_id": "c", "extra": 1}]
)
def test_malformed_payloads_are_poison(raw):
    with pytest.raises(InvalidMessage, match="malformed task payload"):
        parse_payload(raw)


def test_terminal_statuses():
    assert [s.value for s in Status if s.terminal] == ["done", "failed"]
    t = Turn(message_id="m", conversation_id="c", seq=0, text="hi")
    assert t.status is Status.queued and t.public()["status"] == "queued"
