"""Who holds what: each worker's private list of the task messages it holds, and the claim of a dead worker's list
by a live one (Sidekiq's reliable fetch: a working list per process, reclaimed by a peer when the process is gone).

A worker records a task message when it receives it and drops the record when its task ends (``worker.tasks``); a
worker whose heartbeat expired (``worker.store.workers``) can only have been killed, so a live worker claims its
records, atomically (only one claimer gets them), and puts the messages back (``worker.recovery``). Claimed
records stay in the claimer's own list, marked claimed, until their messages are back on a queue: a claimer that
fails half-way finishes at its next pass, and one that dies leaves them to the next claimer. One part of each
store: ``RedisHeld`` of :class:`RedisStore`, ``MemoryHeld`` of :class:`MemoryStore`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import redis
from pydantic import ValidationError
from redis.commands.core import Script

from worker.schemas import HeldTask
from worker.store.base import StoreBase
from worker.store.connection import answering
from worker.store.keys import Keys

log = logging.getLogger(__name__)

# A claimed record's field in the claimer's list: apart from the task ids the claimer itself holds.
CLAIMED = "claimed:"

# Claim a dead worker's records: only while its heartbeat is gone, all of them, into the claimer's own list
# (marked claimed), in one step, so two live workers scanning at the same moment never both put a message back.
CLAIM_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local records = redis.call('HGETALL', KEYS[2])
for i = 1, #records, 2 do
  local field = records[i]
  if string.sub(field, 1, #ARGV[3]) ~= ARGV[3] then field = ARGV[3] .. field end
  redis.call('HSET', KEYS[3], field, records[i + 1])
end
if #records > 0 then redis.call('SADD', KEYS[4], ARGV[2]) end
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[4], ARGV[1])
return records
"""


def _field(task_id: str, claimed: bool) -> str:
    return CLAIMED + task_id if claimed else task_id


def _decode(raw: str) -> HeldTask | None:
    try:
        return HeldTask.model_validate_json(raw)
    except ValidationError:
        log.warning("unreadable held-task record skipped: %.200s", raw)
        return None


def _decode_all(rows: list[str]) -> list[HeldTask]:
    return [t for t in map(_decode, rows) if t is not None]


def _select(records: dict[str, str], claimed: bool) -> list[str]:
    return [raw for field, raw in records.items() if field.startswith(CLAIMED) == claimed]


class RedisHeld(StoreBase):
    """Held task messages in Redis: a hash per worker and the set of their names (mixed into ``RedisStore``)."""

    r: redis.Redis
    keys: Keys
    _claim_script: Script  # CLAIM_LUA, registered by RedisStore

    def hold(self, worker: str, task: HeldTask) -> None:
        with answering():
            pipe = self.r.pipeline(transaction=True)
            pipe.hset(self.keys.held(worker), task.task_id, task.model_dump_json())
            pipe.sadd(self.keys.holders(), worker)
            pipe.execute()

    def release(self, worker: str, task_id: str, claimed: bool = False) -> None:
        with answering():
            self.r.hdel(self.keys.held(worker), _field(task_id, claimed))

    def held_by(self, worker: str, claimed: bool = False) -> list[HeldTask]:
        with answering():
            records = self.r.hgetall(self.keys.held(worker))
        return _decode_all(_select(records, claimed))

    def dead_holders(self) -> list[str]:
        with answering():
            names = sorted(self.r.smembers(self.keys.holders()))
            pipe = self.r.pipeline(transaction=False)
            for name in names:
                pipe.exists(self.keys.worker(name))
            beating = pipe.execute()
        return [name for name, alive in zip(names, beating, strict=True) if not alive]

    def claim_held(self, dead: str, by: str) -> list[HeldTask] | None:
        keys = [self.keys.worker(dead), self.keys.held(dead), self.keys.held(by), self.keys.holders()]
        with answering():
            flat = self._claim_script(keys=keys, args=[dead, by, CLAIMED])
        return None if flat is None else _decode_all(flat[1::2])

    def _all_records(self) -> dict[str, str]:
        with answering():
            names = list(self.r.smembers(self.keys.holders()))
            pipe = self.r.pipeline(transaction=False)
            for name in names:
                pipe.hgetall(self.keys.held(name))
            return {field: raw for records in pipe.execute() for field, raw in records.items()}

    def held_message_ids(self) -> set[str]:
        return {mid for t in _decode_all(list(self._all_records().values())) for mid in t.message_ids()}

    def held_task_ids(self) -> set[str]:
        return {field.removeprefix(CLAIMED) for field in self._all_records()}


class MemoryHeld(StoreBase):
    """The same in one process's memory (mixed into ``MemoryStore``, whose heartbeats say who is alive)."""

    _lock: threading.Lock
    _beating: Callable[[str], bool]  # MemoryWorkers': is this worker's heartbeat live (under the lock)

    def __init__(self) -> None:
        super().__init__()
        self._held: dict[str, dict[str, str]] = {}

    def hold(self, worker: str, task: HeldTask) -> None:
        with self._lock:
            self._held.setdefault(worker, {})[task.task_id] = task.model_dump_json()

    def release(self, worker: str, task_id: str, claimed: bool = False) -> None:
        with self._lock:
            self._held.get(worker, {}).pop(_field(task_id, claimed), None)

    def held_by(self, worker: str, claimed: bool = False) -> list[HeldTask]:
        with self._lock:
            rows = _select(self._held.get(worker, {}), claimed)
        return _decode_all(rows)

    def dead_holders(self) -> list[str]:
        with self._lock:
            return sorted(w for w in self._held if not self._beating(w))

    def claim_held(self, dead: str, by: str) -> list[HeldTask] | None:
        with self._lock:
            if self._beating(dead):
                return None
            records = self._held.pop(dead, {})
            if records:
                mine = self._held.setdefault(by, {})
                for field, raw in records.items():
                    mine[field if field.startswith(CLAIMED) else CLAIMED + field] = raw
        return _decode_all(list(records.values()))

    def held_message_ids(self) -> set[str]:
        with self._lock:
            rows = [raw for records in self._held.values() for raw in records.values()]
        return {mid for t in _decode_all(rows) for mid in t.message_ids()}

    def held_task_ids(self) -> set[str]:
        with self._lock:
            return {field.removeprefix(CLAIMED) for records in self._held.values() for field in records}
