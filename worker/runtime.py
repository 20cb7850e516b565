"""Per-process state of a worker: the one engine, the store, and the heartbeat that says the model is loaded.

``start()`` runs once when the worker process starts (Celery's ``worker_init`` under the solo pool,
``worker_process_init`` in a prefork child); tasks only ever call ``engine()`` and ``store()``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

from worker import metrics, recovery
from worker.settings import Settings, get_settings, redact_url
from worker.store import ResultsStore, store_from_settings

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 5.0

_engine: Any = None
_store: ResultsStore | None = None
_name: str = ""
_stats = {"started_at": 0.0, "tasks": 0, "loads": 0}
_stop = threading.Event()


def start(name: str | None = None, settings: Settings | None = None) -> None:
    """Load the model once and start beating. A second call in the same process does nothing."""
    global _engine, _store, _name
    if _engine is not None:
        return
    from worker.engine import Engine  # torch enters the process here, and only here

    s = settings or get_settings()
    _name = name or f"{socket.gethostname()}.{os.getpid()}"
    log.info("worker %s starting: Redis %s", _name, redact_url(s.redis_url))
    _store = store_from_settings(s)
    engine = Engine(s)
    engine.load()
    _engine = engine
    _store = metrics.start(s, _store, engine.model_id)  # measured when ALLINONE_METRICS_PORT is set
    _stats.update(started_at=time.time(), loads=_stats["loads"] + 1)
    threading.Thread(target=_beat, name="allinone-heartbeat", daemon=True).start()


def _sweep() -> None:
    from worker.app import app

    if _store is not None:
        recovery.sweep(_store, app, get_settings())


def _beat() -> None:
    # A thread, not a Celery timer: the solo pool's only thread is busy inside torch while a task runs, and the
    # heartbeat must keep saying "alive, model loaded" through a long reply.
    last_sweep = 0.0
    while not _stop.is_set():
        if time.monotonic() - last_sweep >= recovery.sweep_interval(get_settings()):
            last_sweep = time.monotonic()
            try:
                _sweep()
            except Exception as e:  # Redis away: try again next time
                log.warning("stale sweep failed: %s", e)
        try:
            assert _store is not None and _engine is not None
            _store.heartbeat(
                _name,
                {"model": _engine.model_id, "pid": os.getpid(), **_stats, "load": _engine.report.as_dict()},
                ttl=int(HEARTBEAT_SECONDS * 3),
            )
        except Exception as e:  # Redis away: the broker connection will say so too; keep beating
            log.debug("heartbeat failed: %s", e)
        _stop.wait(HEARTBEAT_SECONDS)


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
