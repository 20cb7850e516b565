"""A test hook, loaded by a worker whose PYTHONPATH starts with this folder and whose environment sets
``SLOW_TASK_SECONDS``: the reply of a message whose id starts with ``slow-``, and a bulk batch holding one, first
sleep that long, so a test can kill the worker holding it, or check that a busy worker is not robbed.

The model's work is done as always after the pause; nothing of the product is replaced. A worker started without
the variable (its replacement, a second worker) is not slowed down.
"""

from __future__ import annotations

import os
import time
from typing import Any

_DELAY = float(os.environ.get("SLOW_TASK_SECONDS", "0") or 0)

if _DELAY:
    from worker import steps

    _reply_turn, _classify_turns = steps.reply_turn, steps.classify_turns

    def _pause(message_ids: list[str]) -> None:
        if any(m.startswith("slow-") for m in message_ids):
            time.sleep(_DELAY)

    def reply_turn(engine: Any, store: Any, message_id: str, *args: Any, **kwargs: Any) -> Any:
        _pause([message_id])
        return _reply_turn(engine, store, message_id, *args, **kwargs)

    def classify_turns(engine: Any, store: Any, message_ids: list[str], *args: Any, **kwargs: Any) -> Any:
        _pause(message_ids)
        return _classify_turns(engine, store, message_ids, *args, **kwargs)

    steps.reply_turn, steps.classify_turns = reply_turn, classify_turns
