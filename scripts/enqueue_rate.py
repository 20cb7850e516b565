"""How fast ``python -m producer bulk`` enqueues: rows per second from a JSONL file to Redis (no worker needed).

    python scripts/enqueue_rate.py [--rows 50000] [--redis-url redis://127.0.0.1:6379/0]

Times the enqueue side of a bulk job as the command runs it: read and validate the file, store the turns
(pipelined), publish the tasks on a queue of its own that no worker reads, mark them enqueued. Both modes:
``--sentiment-only`` (one classify_batch task per 32 rows) and with replies (one chain per row). Everything it
wrote (its own key prefix, its own queue) is deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis  # noqa: E402

from producer.bulk import BulkJob, CelerySender, Fields, read_jsonl  # noqa: E402
from worker.settings import Settings  # noqa: E402
from worker.store import RedisStore  # noqa: E402

WORDS = "the room was clean and the staff friendly but breakfast was cold and the wifi slow".split()


def write_input(path: Path, rows: int) -> None:
    with path.open("w") as f:
        for i in range(rows):
            text = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(8 + i % 12))
            f.write(json.dumps({"id": i, "text": text, "ts": 1_700_000_000 + 60 * i}) + "\n")


def measure(url: str, path: Path, rows: int, sentiment_only: bool, batch_size: int) -> float:
    tag = uuid.uuid4().hex[:8]
    s = Settings(redis_url=url, key_prefix=f"rate-{tag}", bulk_queue=f"rate-{tag}")
    client = redis.Redis.from_url(url, decode_responses=True)
    store = RedisStore(client, prefix=s.key_prefix, ttl_seconds=600)
    with tempfile.TemporaryDirectory() as d:
        job = BulkJob(
            store=store, sender=CelerySender(s), job=f"rate-{tag}", fields=Fields(), sentiment_only=sentiment_only,
            batch_size=batch_size, bulk_queue=s.bulk_queue, max_chars=s.max_message_chars,
            errors_file=Path(d) / "e.jsonl", spool_path=Path(d) / "spool",
        )
        try:
            with path.open("rb") as f:
                t0 = time.perf_counter()
                job.enqueue(read_jsonl(f, Fields(), s.max_message_chars))
                seconds = time.perf_counter() - t0
            queued = client.llen(s.bulk_queue)
            expect = -(-rows // batch_size) if sentiment_only else rows
            assert job.tally.enqueued == rows and queued >= expect, (job.tally, queued)
        finally:
            pipe = client.pipeline(transaction=False)
            for pattern in (f"{s.key_prefix}:*", f"_kombu.binding*.{s.bulk_queue}"):
                for key in client.scan_iter(pattern, count=5000):
                    pipe.unlink(key)
            pipe.unlink(s.bulk_queue)
            pipe.execute()
    return rows / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--redis-url", default=Settings().redis_url)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "input.jsonl"
        write_input(path, a.rows)
        for sentiment_only in (True, False):
            rate = measure(a.redis_url, path, a.rows, sentiment_only, a.batch_size)
            mode = "sentiment only (classify_batch)" if sentiment_only else "with replies (one chain per row)"
            print(f"{mode:34s} {a.rows:>8,} rows  {rate:>9,.0f} rows/s")


if __name__ == "__main__":
    main()
