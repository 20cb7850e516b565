"""The bulk run's report: its counts, the time buckets behind the plot."""

from __future__ import annotations

from producer import bulk


def test_time_buckets_coarsen_to_stay_bounded():
    b = bulk.TimeBuckets(max_buckets=10)
    for i in range(100):
        b.add(1_700_000_000 + 60 * i, "positive")
    assert len(b.counts) <= 10 and sum(c["positive"] for c in b.counts.values()) == 100


def test_written_results_are_counted_by_status_label_and_time():
    # Given a tally of a run that wrote four results, one of them unfinished at the timeout
    t = bulk.Tally(rows=5, bad=1, enqueued=4)
    t.add_result("done", "positive", 1_700_000_000.0, unfinished=False)
    t.add_result("done", "negative", None, unfinished=False)
    t.add_result("failed", None, 1_700_000_060.0, unfinished=False)
    t.add_result("queued", None, None, unfinished=True)
    # Then the summary counts each by status and label; only labelled rows with a time go to the plot's buckets
    d = t.as_dict()
    assert (d["written"], d["done"], d["failed"], d["pending"]) == (4, 2, 1, 1)
    assert (d["positive"], d["negative"], d["positive_share"]) == (1, 1, 0.5)
    assert sum(sum(c.values()) for c in t.buckets.counts.values()) == 1
