"""Per-process state of a worker: the one engine, the store, its name, what it holds, and the heartbeat thread.

``start()`` runs once when the worker process starts (Celery's ``worker_init`` under the solo pool,
``worker_process_init`` in a prefork child); tasks only ever call ``engine()`` and ``store()``. The heartbeat thread
says "alive, model loaded" every third of ``ALLINONE_HEARTBEAT_TTL_SECONDS`` and gets lost work back
(``worker.recovery``): a dead worker's messages every second, the stale sweep now and then.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from typing import Any

from worker import metrics, recovery
from worker.errors import StoreUnavailable
from worker.schemas import HeldTask
from worker.settings import Settings, get_settings, redact_url
from worker.store import ResultsStore, store_from_settings

log = logging.getLogger(__name__)

_engine: Any = None
_store: ResultsStore | None = None
_name: str = ""
_stats = {"started_at": 0.0, "tasks": 0, "loads": 0}
_stop = threading.Event()
_thread: threading.Thread | None = None


def worker_name() -> str:
    """Unique per process start: a restarted container may reuse both the hostname and the pid, and a new process
    must never pass for the dead one (whose held messages it would then never reclaim)."""
    return f"{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(3)}"


def start(name: str | None = None, settings: Settings | None = None) -> None:
    """Load the model once and start beating. A second call in the same process does nothing."""
    global _engine, _store, _name, _thread
    if _engine is not None:
        return
    from worker.engine import Engine  # torch enters the process here, and only here

    s = settings or get_settings()
    _name = name or worker_name()
    log.info("worker %s starting: Redis %s", _name, redact_url(s.redis_url))
    _store = store_from_settings(s)
    engine = Engine(s)
    engine.load()
    _engine = engine
    _store = metrics.start(s, _store, engine.model_id)  # measured when ALLINONE_METRICS_PORT is set
    _stats.update(started_at=time.time(), loads=_stats["loads"] + 1)
    # Beat before the first message can be received: a worker holding a message without a heartbeat would look dead.
    _heartbeat(s)
    _thread = threading.Thread(target=_beat, args=(s,), name="allinone-heartbeat", daemon=True)
    _thread.start()


def _heartbeat(s: Settings) -> None:
    try:
        assert _store is not None and _engine is not None
        _store.heartbeat(
            _name,
            {"model": _engine.model_id, "pid": os.getpid(), **_stats, "load": _engine.report.as_dict()},
            ttl=s.heartbeat_ttl_seconds,
        )
    except Exception as e:  # Redis away: the broker connection will say so too; keep beating
        log.debug("heartbeat failed: %s", e)


def _beat(s: Settings) -> None:
    # A thread, not a Celery timer: the solo pool's only thread is busy inside torch while a task runs, and the
    # heartbeat must keep saying "alive, model loaded" through a long reply, or a live worker would be robbed.
    from worker.app import app

    last_beat = time.monotonic()
    last_sweep = float("-inf")
    while not _stop.is_set():
        if time.monotonic() - last_beat >= s.heartbeat_ttl_seconds / 3:
            last_beat = time.monotonic()
            _heartbeat(s)
        try:
            assert _store is not None
            kept = _tasks_in_memory()
            if kept is not None:
                recovery.release_dropped(_store, _name, kept)
            recovery.recover(_store, app, _name, s)
        except Exception as e:  # Redis away: the claimed records wait in our list for the next pass
            log.warning("putting back dead workers' messages failed: %s", e)
        if time.monotonic() - last_sweep >= recovery.sweep_interval(s):
            last_sweep = time.monotonic()
            try:
                assert _store is not None
                recovery.sweep(_store, app, s)
            except Exception as e:  # Redis away: try again next time
                log.warning("stale sweep failed: %s", e)
        _stop.wait(recovery.RECLAIM_SCAN_SECONDS)


def _tasks_in_memory() -> set[str] | None:
    """The ids of the task messages Celery holds in this process (received, running or waiting for a countdown);
    None where that cannot be read: another pool than solo keeps them in another process, or they changed while
    read from this thread (the next pass reads them again)."""
    from celery.worker import state

    from worker.app import app

    if app.conf.worker_pool != "solo":
        return None
    try:
        return set(state.requests) | {r.id for r in list(getattr(state, "scheduled_requests", ()))}
    except RuntimeError:
        return None


def hold(task: HeldTask) -> None:
    """Record that this worker holds a task message (so a live worker puts it back if this one dies)."""
    if _store is None:
        return  # not started: nothing is run here before the model is loaded
    try:
        _store.hold(_name, task)
    except StoreUnavailable as e:  # the message is still safe in the broker; only the fast way back is missed
        log.warning("could not record held task %s: %s", task.task_id, e)


def release(task_id: str) -> None:
    """The task ended: this worker holds its message no more."""
    if _store is None:
        return
    try:
        _store.release(_name, task_id)
    except StoreUnavailable as e:  # a stale record is harmless: a finished turn is never sent again
        log.warning("could not drop held task %s: %s", task_id, e)


def stop() -> None:
    """The worker is stopping, after Celery's warm shutdown closed its connection (which gives the broker back the
    messages it had received but not run): stop beating, put back anything the broker did not get back, and hold
    nothing more."""
    _stop.set()
    if _thread is not None:
        _thread.join(timeout=2)
    if _store is None:
        return
    from worker.app import app
    from worker.contract import put_back

    try:
        mine = _store.held_by(_name)
        put_back(app, [t.delivery_tag for t in mine if t.delivery_tag])
        for t in mine:
            _store.release(_name, t.task_id)
    except Exception as e:  # Redis away: the records stay, and a live worker reclaims them once our beat expires
        log.warning("could not hand back held tasks: %s", e)


def engine() -> Any:
    if _engine is None:
        # Only reached when a task runs in a process that never went through start() (misconfigured pool).
        start()
    return _engine


def store() -> ResultsStore:
    if _store is None:
        start()
    assert _store is not None
    return _store


def count_task() -> None:
    _stats["tasks"] += 1
