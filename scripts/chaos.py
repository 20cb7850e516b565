"""Chaos run: many messages over many conversations while the worker is killed (kill -9) at random moments and
Redis is restarted; at the end every message must have exactly one turn, done, with a label and a reply, in
submission order, each reply's context exactly the turns before it.

    python scripts/chaos.py --messages 1000 --conversations 50 --kills 10 --redis-restarts 1
    python scripts/chaos.py --model PATH.gguf ...      # a real model instead of the tiny local one

Redis runs here on its own port with an append-only file synced on every write (as a production broker should),
so a restart keeps queued and unacknowledged messages. A killed worker is replaced at once (as a supervisor does).
The visibility timeout is the product's (ten minutes): what comes back sooner was put back by a live worker.
Faults come at random moments, at least ``--fault-gap`` seconds apart, all while messages are still being sent
(closer if the run is too short to space them so: a kill of an idle worker measures nothing).

Prints one JSON object with the counts and, for the messages the kills touched (those the killed worker held),
how long the held step waited after the kill and beyond its usual time, and the worst stall of a touched
conversation (how much longer than the median conversation it took, after the kill, to answer every turn
submitted before it); exit 1 if anything was lost, duplicated, out of order or failed.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from producer.client import Producer
from worker import contract
from worker.errors import StoreUnavailable
from worker.schemas import HeldTask, Status, Turn
from worker.settings import Settings
from worker.store import ResultsStore
from worker.testing import RedisServer, WorkerProcess, build_tiny_model, task_seconds, worker_env


def held_at_kill(store: ResultsStore, worker: WorkerProcess) -> list[HeldTask]:
    """What a worker held when it was killed: read right after the kill, as a live worker claims it only once the
    dead one's heartbeat has expired."""
    assert worker.proc is not None
    names = [name for name, info in store.workers().items() if info.get("pid") == worker.proc.pid]
    return [t for n in names for t in store.held_by(n) + store.held_by(n, claimed=True)]


def step_done_at(task: HeldTask, turn: Turn) -> float | None:
    """When the held task's own step was done: the label for a sentiment task or a bulk batch, the reply for a
    reply task. What follows a label (its reply, queued behind everything waiting) is the normal course."""
    if task.task == contract.REPLY:
        return turn.done_at
    return turn.classified_at or turn.done_at


def catch_up(turns: list[Turn], since: float) -> float:
    """From ``since`` until the conversation had answered every turn submitted before it."""
    return max([since] + [t.done_at for t in turns if t.created_at < since and t.done_at is not None]) - since


def recovery_report(touched: dict[str, tuple[float, HeldTask]], turns: dict[str, Turn],
                    convs: dict[str, list[Turn]], took: dict[str, float]) -> dict[str, object]:
    """How long the work the kills touched waited, and how much longer its conversations took to catch up.

    A touched message's wait runs from the kill until the step its worker held was done again; its extra wait
    is that minus the step's usual time (the median from the logs). A touched conversation's stall is how much
    longer it took, after the kill, to answer every turn submitted before the kill than the median conversation
    did at the same moment: the backlog in front of everyone is not the kill's doing."""
    waited, extra, stalls = [], [], []
    for mid, (killed_at, task) in touched.items():
        turn = turns.get(mid)
        done = step_done_at(task, turn) if turn is not None else None
        if turn is None or done is None:
            continue
        waited.append(done - killed_at)
        extra.append(max(0.0, done - killed_at - took.get(task.task, 0.0)))
        others = [catch_up(ts, killed_at) for c, ts in convs.items() if c != turn.conversation_id]
        stalls.append(catch_up(convs.get(turn.conversation_id, []), killed_at) - statistics.median(others or [0.0]))
    return {
        "touched": len(touched),
        "worst_wait_after_kill_seconds": round(max(waited, default=0.0), 1),
        "worst_extra_wait_seconds": round(max(extra, default=0.0), 1),
        "median_extra_wait_seconds": round(statistics.median(extra), 1) if extra else 0.0,
        "worst_conversation_stall_seconds": round(max(stalls, default=0.0), 1),
        "task_seconds": {k.removeprefix("allinone."): round(v, 3) for k, v in sorted(took.items())},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=1000)
    ap.add_argument("--conversations", type=int, default=50)
    ap.add_argument("--kills", type=int, default=10, help="how many times the worker is killed with SIGKILL")
    ap.add_argument("--redis-restarts", type=int, default=1)
    ap.add_argument("--model", help="model for the worker (default: a tiny local Qwen2 built here)")
    ap.add_argument("--visibility", type=int, default=600, help="ALLINONE_VISIBILITY_TIMEOUT_SECONDS for the run")
    ap.add_argument("--rate", type=float, default=100.0, help="messages submitted per second")
    ap.add_argument("--timeout", type=float, default=1800.0, help="give up waiting after this many seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--busy-wait", type=float, default=10.0,
                    help="before a kill, wait up to this long for the worker to hold a message, so the kill lands "
                    "mid-task (0: kill at once)")
    ap.add_argument("--fault-gap", type=float, default=20.0,
                    help="least seconds between two faults: the recovery bound is about one fault at a time (the "
                    "heartbeat TTL, 15 s, plus a few); closer faults add up")
    a = ap.parse_args()
    rnd = random.Random(a.seed)

    tmp = Path(tempfile.mkdtemp(prefix="allinone-chaos-"))
    model = a.model
    if model is None:
        model = str(build_tiny_model(tmp / "tiny"))
    # appendfsync always: a restart keeps every acknowledged write, as a production broker should
    server = RedisServer(durable_dir=tmp).start()
    env = worker_env(server.url, model, tmp / "cache", ALLINONE_VISIBILITY_TIMEOUT_SECONDS=str(a.visibility),
                     ALLINONE_THREADS="2",
                     # room for a whole conversation, so every reply's context must be exactly the turns before it
                     ALLINONE_HISTORY_TOKENS="8192")
    workers: list[WorkerProcess] = []

    def new_worker() -> WorkerProcess:
        w = WorkerProcess(env=env, log_path=tmp / f"worker-{len(workers)}.log").start(wait_ready=0)
        workers.append(w)
        return w

    current = new_worker()
    current.wait_ready(600)
    crashes = 0
    swap = threading.Lock()
    finished = threading.Event()

    def supervise() -> None:
        # What a process supervisor (compose's restart policy, systemd) does: a worker that ends on its own is
        # started again. Celery can end a worker with "Unrecoverable error" when Redis drops while the worker
        # holds unacknowledged messages (kombu's restore at connection close); the messages it held are put back
        # by a live worker once its heartbeat expires, so only the process needs replacing.
        nonlocal current, crashes
        while not finished.wait(0.5):
            with swap:
                if current.proc is not None and current.proc.poll() is not None:
                    crashes += 1
                    current = new_worker()

    threading.Thread(target=supervise, daemon=True).start()
    producer = Producer(settings=Settings(redis_url=server.url, redis_retry_seconds=30))
    convs = [f"chaos-{i}" for i in range(a.conversations)]
    sent: dict[str, list[str]] = {c: [] for c in convs}
    submitted = threading.Event()
    retries = 0
    t0 = time.monotonic()

    def produce() -> None:
        nonlocal retries
        for i in range(a.messages):
            conv = convs[i % len(convs)]
            mid = f"{conv}-m{len(sent[conv])}"
            while True:  # the producer's contract: an error means "not stored": submit again, same id
                try:
                    producer.submit(conv, f"message {i} of the chaos run, turn {len(sent[conv])}", message_id=mid)
                    break
                except StoreUnavailable:
                    retries += 1
                    time.sleep(0.5)
            sent[conv].append(mid)
            time.sleep(1.0 / a.rate)
        submitted.set()

    producer_thread = threading.Thread(target=produce, daemon=True)
    producer_thread.start()

    # Faults at random moments while the messages flow: kills spread over the run, Redis restarts in between.
    expected = a.messages / a.rate + a.messages * 0.05
    events = ["kill"] * a.kills + ["redis"] * a.redis_restarts
    rnd.shuffle(events)
    kills = restarts = 0
    touched: dict[str, tuple[float, HeldTask]] = {}  # message id: (when its worker was killed, the task it held)
    last_fault = time.monotonic()
    production_ends = t0 + a.messages / a.rate
    for i, event in enumerate(events):
        gap = max(a.fault_gap, rnd.uniform(0.2, 2.0) * expected / max(1, len(events)))
        # A kill after the last message is sent finds an idle worker and measures no recovery: the faults all land
        # while messages still flow (closer than --fault-gap if the run is too short to space them so).
        gap = min(gap, max(1.0, (production_ends - time.monotonic()) / (len(events) - i + 1)))
        time.sleep(max(0.0, last_fault + gap - time.monotonic()))
        last_fault = time.monotonic()
        if event == "kill":
            # A kill is meant to land mid-task; an idle worker loses nothing and measures no recovery.
            busy_by = time.monotonic() + a.busy_wait
            while time.monotonic() < busy_by:
                try:
                    if held_at_kill(producer.store, current):
                        break
                except StoreUnavailable:
                    pass
                time.sleep(0.01)
            with swap:
                victim = current
                victim.kill()
                killed_at = time.time()
                kills += 1
                current = new_worker()
            try:
                for task in held_at_kill(producer.store, victim):
                    for mid in task.message_ids():
                        touched.setdefault(mid, (killed_at, task))
            except StoreUnavailable:
                pass
            current.wait_ready(600)
        else:
            server.stop()
            time.sleep(rnd.uniform(0.5, 2.0))
            server.start()
            restarts += 1
    producer_thread.join()

    # Wait for every turn to finish (or the timeout).
    all_ids = [m for c in convs for m in sent[c]]
    deadline = time.monotonic() + a.timeout
    while time.monotonic() < deadline:
        try:
            turns = producer.store.get_turns(all_ids)
        except StoreUnavailable:
            continue
        if all(t is not None and t.status.terminal for t in turns):
            break
        time.sleep(1)
    elapsed = time.monotonic() - t0
    finished.set()

    lost = duplicated = out_of_order = failed = wrong_context = unlabelled = 0
    by_conv: dict[str, list[Turn]] = {}
    for conv in convs:
        try:
            got = producer.conversation(conv).turns
        except Exception:
            got = []
        by_conv[conv] = got
        ids = [t.message_id for t in got]
        lost += len(set(sent[conv]) - set(ids)) + sum(
            1 for t in got if not t.status.terminal
        )
        duplicated += len(ids) - len(set(ids))
        out_of_order += int(ids != sent[conv] and sorted(set(ids)) == sorted(set(sent[conv])))
        for i, t in enumerate(got):
            failed += t.status is Status.failed
            unlabelled += t.status is Status.done and (t.sentiment is None or t.reply is None)
            wrong_context += t.status is Status.done and t.context != ids[:i]
    final = {t.message_id: t for t in producer.store.get_turns(all_ids) if t is not None}
    attempts = sum(t.attempts for t in final.values())
    recovery = recovery_report(touched, final, by_conv, task_seconds([w.log_path for w in workers]))
    report = {
        "messages": a.messages, "conversations": a.conversations, "kills": kills, "redis_restarts": restarts,
        "lost": lost, "duplicated": duplicated, "out_of_order": out_of_order, "failed": failed,
        "wrong_context": wrong_context, "unlabelled": unlabelled, "redeliveries": attempts - a.messages,
        "producer_retries": retries, "worker_crashes_restarted": crashes, "seconds": round(elapsed, 1),
        "recovery": recovery, "logs": str(tmp),
    }
    print(json.dumps(report))
    for w in workers:
        w.stop(timeout=10)
    server.stop()
    bad = lost + duplicated + out_of_order + failed + wrong_context + unlabelled
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
