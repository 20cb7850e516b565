"""How fast ``python -m producer bulk`` enqueues, and how much memory it takes (no worker needed).

    python scripts/enqueue_rate.py [--rows 50000] [--rss-rows 100000] [--redis-url redis://127.0.0.1:6379/0]

Run it from a set-up checkout (``bash scripts/setup.sh``, then ``. .venv/bin/activate``).

Times the enqueue side of a bulk job as the command runs it: read and validate the file, store the turns
(pipelined), publish the tasks on a queue of its own that no worker reads, mark them enqueued. Both modes:
``--sentiment-only`` (one classify_batch task per 32 rows) and with replies (the same batches, asking the worker
to send each reply). Everything it wrote (its own key prefix, its own queue) is deleted afterwards.

Memory: runs the real command (``python -m producer bulk``) as a child on a ``--rss-rows`` JSONL file, once with
``--no-wait`` (read, store, enqueue), then, after marking every turn done the way a worker would, again to collect
and write all the results; prints each run's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import redis

from producer.bulk import BulkJob, CelerySender, Fields, JobConfig, read_jsonl
from worker.settings import Settings
from worker.store import Keys, RedisStore
from worker.testing import PROJECT_ROOT

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
        config = JobConfig(job=f"rate-{tag}", fields=Fields(), sentiment_only=sentiment_only,
                           batch_size=batch_size, queue=s.bulk_queue, errors_file=Path(d) / "e.jsonl",
                           spool_path=Path(d) / "spool")
        job = BulkJob(config, store, CelerySender(s))
        try:
            with path.open("rb") as f:
                t0 = time.perf_counter()
                job.enqueue(read_jsonl(f, Fields(), s.max_message_chars))
                seconds = time.perf_counter() - t0
            queued = client.llen(s.bulk_queue)
            expect = -(-rows // batch_size)  # one classify_batch per batch_size rows, in both modes
            assert job.tally.enqueued == rows and queued >= expect, (job.tally, queued)
        finally:
            pipe = client.pipeline(transaction=False)
            for pattern in (store.keys.everything, f"_kombu.binding*.{s.bulk_queue}"):
                for key in client.scan_iter(pattern, count=5000):
                    pipe.unlink(key)
            pipe.unlink(s.bulk_queue)
            pipe.execute()
    return rows / seconds


def _mark_all_done(client: redis.Redis, prefix: str) -> int:
    """What a worker would leave on each turn of a sentiment-only job: done, with a label."""
    n = 0
    pipe = client.pipeline(transaction=False)
    for key in client.scan_iter(Keys(prefix).turn.match, count=5000):
        n += 1
        label = "positive" if n % 3 else "negative"
        pipe.hset(key, mapping={"status": "done", "reply": "", "model": "simulated",
                                "sentiment": json.dumps({"label": label, "confidence": 0.9, "method": "prompt"})})
        if n % 5000 == 0:
            pipe.execute()
    pipe.execute()
    return n


def measure_rss(url: str, rows: int) -> tuple[int, int]:
    """Peak RSS (MB) of ``python -m producer bulk`` enqueuing ``rows`` rows, and of collecting them."""
    tag = uuid.uuid4().hex[:8]
    prefix = f"rss-{tag}"
    env = {**os.environ, "ALLINONE_REDIS_URL": url, "ALLINONE_KEY_PREFIX": prefix, "ALLINONE_BULK_QUEUE": prefix}
    client = redis.Redis.from_url(url, decode_responses=True)
    peaks = []
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "input.jsonl"
        write_input(src, rows)
        cmd = [sys.executable, "-m", "producer", "bulk", str(src), "--out", str(Path(d) / "out.jsonl"),
               "--sentiment-only", "--timestamp-field", "ts", "--timeout", "30"]
        try:
            for extra in (["--no-wait"], []):
                if not extra:
                    _mark_all_done(client, prefix)
                p = subprocess.Popen(cmd + extra, cwd=PROJECT_ROOT, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
                out = p.stdout.read() if p.stdout else b""
                _, status, usage = os.wait4(p.pid, 0)
                p.returncode = os.waitstatus_to_exitcode(status)
                summary = json.loads(out.decode().strip().splitlines()[-1])
                assert p.returncode == 0 and summary["good"] == rows, summary
                assert extra or summary["written"] == rows, summary
                peaks.append(usage.ru_maxrss // 1024)  # KB on Linux
        finally:
            pipe = client.pipeline(transaction=False)
            for pattern in (Keys(prefix).everything, f"_kombu.binding*.{prefix}"):
                for key in client.scan_iter(pattern, count=5000):
                    pipe.unlink(key)
            pipe.unlink(prefix)
            pipe.execute()
    return peaks[0], peaks[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rss-rows", type=int, default=100_000, help="rows for the memory check (0: skip it)")
    ap.add_argument("--redis-url", default=Settings().redis_url)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "input.jsonl"
        write_input(path, a.rows)
        for sentiment_only in (True, False):
            rate = measure(a.redis_url, path, a.rows, sentiment_only, a.batch_size)
            mode = "sentiment only (classify_batch)" if sentiment_only else "with replies (classify_batch, reply=True)"
            print(f"{mode:34s} {a.rows:>8,} rows  {rate:>9,.0f} rows/s")
    if a.rss_rows:
        enqueue_mb, collect_mb = measure_rss(a.redis_url, a.rss_rows)
        print(f"peak RSS of python -m producer bulk, {a.rss_rows:,} rows: enqueue {enqueue_mb} MB, "
              f"collect {collect_mb} MB")


if __name__ == "__main__":
    main()
