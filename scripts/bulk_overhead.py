"""How much the queue costs on the bulk path: the engine's batched sentiment rate in this process, then the same
messages end to end through ``python -m producer bulk --sentiment-only`` and a real worker, in one run.

    python scripts/bulk_overhead.py --model PATH [--n 400] [--data FILE ...]

Messages: the zh and en dev sets shipped with the product, half of ``--n`` from each (``--data`` for others).
Prints one JSON object: engine_messages_per_second, queue_messages_per_second, overhead (1 - queue/engine).
Uses the local Redis db 12 (ALLINONE_REDIS_URL to change it) and flushes it. Run it from a set-up checkout
(``bash scripts/setup.sh``, then ``. .venv/bin/activate``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from worker.settings import Settings
from worker.testing import PROJECT_ROOT, WorkerProcess, worker_env
from worker.tools import datasets


def messages(files: list[Path], n: int) -> list[dict]:
    """The first ``n / len(files)`` rows of each file, with an ``id`` (the row's own, else its line number)."""
    rows = []
    for path in files:
        with path.open(encoding="utf-8") as f:
            for i, line in zip(range(n // len(files)), f, strict=False):
                row = json.loads(line)
                rows.append({"id": row.get("id", f"{path.stem}-{i}"), "text": row["text"]})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--data", type=Path, action="append",
                    help="JSON Lines with a 'text' field; repeatable (default: the shipped zh and en dev sets)")
    ap.add_argument("--no-wait", action="store_true",
                    help="enqueue with --no-wait and poll the store once a second instead of the command collecting")
    a = ap.parse_args()
    url = os.environ.get("ALLINONE_REDIS_URL", "redis://127.0.0.1:6379/12")
    rows = messages(a.data or [datasets.shipped(lang, "dev") for lang in datasets.LANGS], a.n)
    threads = str(len(os.sched_getaffinity(0)))

    # 1. the engine alone, batched, as the worker's classify_batch runs it
    from worker.engine import Engine
    from worker.store import Keys

    engine = Engine(Settings(model=a.model, threads=int(threads)))
    engine.load()
    texts = [r["text"] for r in rows]
    engine.classify(texts[: a.batch_size], batch_size=a.batch_size)  # warm-up
    t0 = time.perf_counter()
    engine.classify(texts, batch_size=a.batch_size)
    engine_rate = len(texts) / (time.perf_counter() - t0)
    del engine
    gc.collect()

    # 2. the same messages through Redis, the bulk command and a real worker
    import redis

    redis.Redis.from_url(url).flushdb()
    tmp = Path(tempfile.mkdtemp(prefix="allinone-bulk-overhead-"))
    inp = tmp / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": r["id"], "text": r["text"]}, ensure_ascii=False) + "\n" for r in rows))
    env = worker_env(url, a.model, Settings().cache_dir, ALLINONE_THREADS=threads,
                     ALLINONE_SENTIMENT_BATCH_SIZE=str(a.batch_size))
    env.pop("ALLINONE_DTYPE")  # as the worker runs by default
    worker = WorkerProcess(env=env, log_path=tmp / "worker.log").start(wait_ready=900)
    try:
        t0 = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-m", "producer", "bulk", str(inp), "--sentiment-only", "--out", str(tmp / "out.jsonl"),
             "--batch-size", str(a.batch_size), *(["--no-wait"] if a.no_wait else [])],
            cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
        )
        if a.no_wait:
            r = redis.Redis.from_url(url, decode_responses=True)
            turns = Keys(Settings.model_fields["key_prefix"].default).turn.match  # the prefix the worker runs with
            while any(r.hget(k, "status") not in ("done", "failed") for k in r.scan_iter(turns)):
                time.sleep(1.0)
        queue_rate = len(rows) / (time.perf_counter() - t0)
    finally:
        worker.stop()
    if out.returncode != 0:
        print(out.stderr[-2000:], file=sys.stderr)
        return 1
    print(json.dumps({
        "n": len(rows), "batch_size": a.batch_size, "threads": int(threads),
        "engine_messages_per_second": round(engine_rate, 2), "queue_messages_per_second": round(queue_rate, 2),
        "overhead": round(1 - queue_rate / engine_rate, 3),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
