"""Bulk ids: job names, message ids and conversation ids are derived from the command and the input, never random."""

from __future__ import annotations

import pytest

from producer import bulk
from worker.errors import InvalidMessage


def test_message_ids_are_deterministic_and_readable():
    job = bulk.default_job("data/feedback.jsonl", "jsonl", bulk.Fields(), True)
    assert job == bulk.default_job("data/feedback.jsonl", "jsonl", bulk.Fields(), True)
    assert job.startswith("feedback-")
    # other options, another job: its rows never collide with this one's
    assert job != bulk.default_job("data/feedback.jsonl", "jsonl", bulk.Fields(), False)
    assert job != bulk.default_job("data/other.jsonl", "jsonl", bulk.Fields(), True)
    assert bulk.message_id("j", bulk.Row(7, "t", "42")) == "bulk:j:i:42"
    assert bulk.message_id("j", bulk.Row(7, "t")) == "bulk:j:L:7"
    odd = bulk.message_id("j", bulk.Row(7, "t", "an id with spaces"))
    assert odd.startswith("bulk:j:h:") and odd == bulk.message_id("j", bulk.Row(9, "u", "an id with spaces"))


def test_rows_are_their_own_conversation_unless_a_field_groups_them():
    assert bulk.conversation_id("j", bulk.Row(1, "t", "5")) == "bulk:j:i:5"
    assert bulk.conversation_id("j", bulk.Row(1, "t", "5", "u-9")) == "bulk:j:c:i:u-9"


def test_a_job_name_is_checked_before_it_names_anything():
    assert bulk.check_job_name("export-2026.11_a") == "export-2026.11_a"
    for name in ("a b", "", "x" * 65, "bulk:job"):
        with pytest.raises(InvalidMessage, match="--job must be"):
            bulk.check_job_name(name)
