"""The Lua scripts of the Redis store, and how their arguments are built and their replies read.

No I/O here: the blocking store (``worker.store.redis``) and the asyncio one (``worker.store.aio``) run the same
scripts with the same arguments, so creating a turn is one implementation whichever client a producer uses.
"""

from __future__ import annotations

import json
from typing import Any

from worker import events
from worker.errors import MessageIdConflict
from worker.schemas import Turn
from worker.store.codec import check_same, turn_from_fields, turn_to_fields
from worker.store.keys import Keys

# Creating a turn, atomically: an existing turn is returned as it is (idempotency by message id); otherwise the id
# is appended to its conversation, whose new length gives the turn's seq, and the turn is written with that seq,
# with (unless empty) its place in the pending index and its `queued` event. The event's JSON is completed here
# because only here is the seq known.
#   KEYS: turn, conversation, pending index, events
#   ARGV: ttl, message_id, pending score or '', queued event data (a JSON object) or '', events cap, field, value...
CREATE_LUA = """
local unpack = unpack or table.unpack
local existing = redis.call('HGETALL', KEYS[1])
if #existing > 0 then return {0, existing} end
local seq = redis.call('RPUSH', KEYS[2], ARGV[2]) - 1
redis.call('HSET', KEYS[1], 'seq', seq, unpack(ARGV, 6))
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[1])
if ARGV[3] ~= '' then redis.call('ZADD', KEYS[3], ARGV[3], ARGV[2]) end
if ARGV[4] ~= '' then
  local data = '{"seq":' .. seq .. ',' .. string.sub(ARGV[4], 2)
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[5], '*', 'type', 'queued', 'data', data)
  redis.call('EXPIRE', KEYS[4], ARGV[1])
end
return {1, seq}
"""

# Marking a turn enqueued, unless it expired meanwhile (HSET alone would create a turn of one field).
ENQUEUED_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'enqueued_at', ARGV[1])
return 1
"""

# A reply attempt begins: count it, and when the stream's last event is a token (an earlier attempt was cut off
# mid-reply) say so with a `restart` event, so readers drop the partial text before the new tokens arrive.
#   KEYS: turn, events    ARGV: ttl, events cap    returns the attempt number, or -1 when the turn is not stored
BEGIN_REPLY_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local n = redis.call('HINCRBY', KEYS[1], 'reply_attempts', 1)
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
if #last > 0 then
  local f = last[1][2]
  for i = 1, #f, 2 do
    if f[i] == 'type' and f[i + 1] == 'token' then
      redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'type', 'restart', 'data', '{"attempt":' .. n .. '}')
      redis.call('EXPIRE', KEYS[2], ARGV[1])
    end
  end
end
return n
"""


def queued_data(turn: Turn) -> dict[str, Any]:
    """The ``queued`` event's data (its seq is added where the seq is assigned)."""
    return {"conversation_id": turn.conversation_id, "queue": turn.queue}


def create_call(keys: Keys, ttl: int, turn: Turn, pending_score: float | None, queued_event: bool) -> tuple[
    list[str], list[Any]
]:
    """The KEYS and ARGV of :data:`CREATE_LUA` for a new turn (its seq is assigned by the script)."""
    fields = turn_to_fields(turn)
    del fields["seq"]
    event = json.dumps(queued_data(turn), ensure_ascii=False, separators=(",", ":")) if queued_event else ""
    args: list[Any] = [ttl, turn.message_id, "" if pending_score is None else pending_score, event, events.EVENTS_CAP]
    for k, v in fields.items():
        args += [k, v]
    names = [keys.turn(turn.message_id), keys.conv(turn.conversation_id), keys.pending(), keys.events(turn.message_id)]
    return names, args


def created(turn: Turn, reply: list[Any]) -> tuple[Turn, bool] | MessageIdConflict:
    """What :data:`CREATE_LUA` answered for ``turn``: the new turn with its seq, the stored one (same content), or
    the conflict of a message id stored with another conversation or text."""
    was_created, value = reply
    if was_created:
        return turn.model_copy(update={"seq": int(value)}), True
    old = turn_from_fields(dict(zip(value[::2], value[1::2], strict=True)))
    try:
        check_same(old, turn.conversation_id, turn.text)
    except MessageIdConflict as e:
        return e
    return old, False
