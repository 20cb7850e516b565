"""``python -m worker.health``: is a worker ready to take messages? For container healthchecks and scripts.

    python -m worker.health [--timeout S] [--json] [--this-host [HOST]]

Ready means two things: the broker (Redis at ALLINONE_REDIS_URL) answers, and at least one worker heartbeat (the
``worker`` key of ``worker.store.keys``, written every few seconds once a worker's model is loaded, by
``worker.runtime``) has not expired. A worker still loading its model has no heartbeat yet, so it is not ready.

Exit codes: 0 ready, 1 Redis answers but no worker has its model loaded, 2 Redis does not answer (or the
settings are invalid). One status line on stdout (JSON with ``--json``); the reason of a failure on stderr.

``--this-host`` (a container healthcheck): only heartbeats of workers on this machine count, so one healthy
worker elsewhere does not make a container whose own worker is stuck look healthy.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import sys
from typing import Any

import redis

from worker.errors import StoreUnavailable
from worker.store import ResultsStore

STATUS_OK = "ok"
STATUS_NO_WORKER = "no_worker"
STATUS_REDIS_DOWN = "redis_down"
EXIT_CODES = {STATUS_OK: 0, STATUS_NO_WORKER: 1, STATUS_REDIS_DOWN: 2}

# What a heartbeat says that is worth showing; the load report is long and stays in Redis.
_SHOWN = ("model", "pid", "tasks", "started_at")


def on_host(worker: str, host: str) -> bool:
    """True when the worker name holds ``host`` as a whole label: ``allinone-7@web1`` and ``web1.42`` are on
    ``web1``; ``allinone-7@web10`` is not (a bare substring test would say it is)."""
    label = r"[A-Za-z0-9_-]"
    return re.search(rf"(?<!{label}){re.escape(host)}(?!{label})", worker) is not None


def check(store: ResultsStore, this_host: str | None = None) -> dict[str, Any]:
    """The health of the stack as the store sees it; ``status`` is ``ok``, ``no_worker`` or ``redis_down``.

    Never raises for a Redis that does not answer: that is a status like the others.
    """
    try:
        store.ping()
        beats = store.workers()
    except (StoreUnavailable, redis.exceptions.RedisError) as e:
        # A refused password (NOAUTH, WRONGPASS) is a ResponseError, not a connection error: to us it is the
        # same broker that will not serve.
        detail = str(e.__cause__ or e)
        return {"ok": False, "status": STATUS_REDIS_DOWN, "redis": "unavailable", "workers": [],
                "error": f"Redis did not answer ({detail})", "detail": detail}

    workers, ignored = [], []
    for name in sorted(beats):
        if this_host is not None and not on_host(name, this_host):
            ignored.append(name)
            continue
        info = beats[name]
        workers.append({"name": name, **{k: info[k] for k in _SHOWN if k in info}})

    out: dict[str, Any] = {"ok": bool(workers), "status": STATUS_OK if workers else STATUS_NO_WORKER,
                           "redis": "ok", "workers": workers}
    if this_host is not None:
        out["this_host"] = this_host
        out["other_hosts"] = ignored
    if not workers:
        where = f" on host {this_host!r}" if this_host is not None else ""
        out["error"] = f"no worker{where} has its model loaded (no live heartbeat)"
    return out


def _summary(result: dict[str, Any]) -> str:
    if result["status"] == STATUS_OK:
        names = ", ".join(
            f"{w['name']} ({w.get('model', '?')}, pid {w.get('pid', '?')})" for w in result["workers"]
        )
        return f"ok: {len(result['workers'])} worker(s) ready: {names}"
    return f"{result['status']}: {result['error']}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m worker.health",
        description="Exit 0 when Redis answers and a worker has its model loaded, "
        "1 when no worker has, 2 when Redis does not answer.",
    )
    p.add_argument(
        "--timeout", type=float, default=3.0, help="Seconds to wait for Redis to answer (default 3)."
    )
    p.add_argument("--json", action="store_true", help="Print the status as one line of JSON.")
    p.add_argument(
        "--this-host",
        nargs="?",
        const=socket.gethostname(),
        default=None,
        metavar="HOST",
        help="Count only workers on this machine (its hostname, or HOST).",
    )
    a = p.parse_args(argv)

    from pydantic import ValidationError
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from worker.settings import Settings, redact_url
    from worker.store import RedisStore

    try:
        s = Settings()
    except ValidationError as e:
        # Never print the input values: the Redis URL may hold a password.
        reasons = "; ".join(
            f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors(include_input=False)
        )
        print(f"invalid settings: {reasons}", file=sys.stderr)
        return EXIT_CODES[STATUS_REDIS_DOWN]

    url = redact_url(s.redis_url)
    # One try, bounded by --timeout: a healthcheck must answer on time, not retry like the worker does.
    client = redis.Redis.from_url(
        s.redis_url,
        decode_responses=True,
        socket_connect_timeout=a.timeout,
        socket_timeout=a.timeout,
        retry=Retry(NoBackoff(), 0),
    )
    try:
        result = check(RedisStore(client, prefix=s.key_prefix), this_host=a.this_host)
    finally:
        client.close()
    result["redis_url"] = url
    if result["status"] == STATUS_REDIS_DOWN:
        result["error"] = f"Redis at {url} did not answer within {a.timeout:g} s ({result['detail']})"

    print(json.dumps(result, ensure_ascii=False, default=str) if a.json else _summary(result))
    if not result["ok"]:
        print(f"unhealthy: {result['error']}", file=sys.stderr)
    return EXIT_CODES[result["status"]]


if __name__ == "__main__":
    sys.exit(main())
