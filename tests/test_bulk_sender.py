"""How a chunk's rows become classify_batch tasks."""

from __future__ import annotations

from producer import bulk


def rows(*texts: str) -> list[tuple[dict[str, str], str]]:
    return [({"message_id": f"m{i}", "conversation_id": f"c{i}"}, t) for i, t in enumerate(texts)]


def ids(batches: list[list[dict[str, str]]]) -> list[list[str]]:
    return [[p["message_id"] for p in b] for b in batches]


def test_rows_are_cut_into_batches_shortest_first_by_utf8_bytes():
    # Given 4 CJK characters (12 bytes), 10 Latin letters, and two short rows of the same length
    given = rows("服务很好", "abcdefghij", "ab", "cd")
    # When batched by length
    batches = bulk.make_batches(given, batch_size=3, by_length=True)
    # Then bytes decide, not characters, and rows of equal length keep their order
    assert ids(batches) == [["m2", "m3", "m1"], ["m0"]]


def test_rows_keep_their_input_order_when_not_batched_by_length():
    assert ids(bulk.make_batches(rows("long row", "a", "mid"), batch_size=2, by_length=False)) == [
        ["m0", "m1"], ["m2"]]
    assert bulk.make_batches([], batch_size=2, by_length=True) == []
