"""``python -m producer``: send messages, wait for them, show conversations, back-process files.

    python -m producer send --conversation ID TEXT      -> {"message_id": ..., "conversation_id": ...}
    python -m producer wait MESSAGE_ID [--timeout S]    -> the finished turn; exit 1 failed, 3 timeout
    python -m producer show ID                          -> {"conversation_id": ..., "turns": [...]}
    python -m producer dead-letters [--limit N]         -> malformed task messages and why
    python -m producer bulk INPUT --out RESULTS ...     -> see ``python -m producer bulk --help``

Exit codes: 0 ok, 1 the turn failed, 2 bad input, 3 timed out, 4 unknown id, 5 Redis unavailable.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from worker.errors import (
    AllInOneError,
    InvalidMessage,
    MessageIdConflict,
    StoreUnavailable,
    UnknownConversation,
    UnknownMessage,
    WaitTimeout,
)

EXIT = {InvalidMessage: 2, MessageIdConflict: 2, WaitTimeout: 3, UnknownConversation: 4, UnknownMessage: 4,
        StoreUnavailable: 5}


def _print(obj: Any) -> None:
    print(json.dumps(obj, ensure_ascii=False))


def _producer() -> Any:
    from producer.client import Producer

    return Producer()


def cmd_send(a: argparse.Namespace) -> int:
    p = _producer()
    mid = p.submit(a.conversation, a.text, message_id=a.message_id, queue=a.queue)
    _print({"message_id": mid, "conversation_id": a.conversation})
    return 0


def cmd_wait(a: argparse.Namespace) -> int:
    turn = _producer().wait(a.message_id, timeout=a.timeout)
    _print(turn.public())
    return 1 if turn.status.value == "failed" else 0


def cmd_show(a: argparse.Namespace) -> int:
    _print(_producer().conversation(a.conversation_id).public())
    return 0


def cmd_dead(a: argparse.Namespace) -> int:
    _print(_producer().store.dead_letters(a.limit))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m producer",
        description="Send messages, wait for them, show conversations, back-process files.",
        epilog="Exit codes: 0 ok, 1 the turn failed, 2 bad input, 3 timed out, 4 unknown id, 5 Redis unavailable.",
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("send", help="enqueue one message; prints its message id at once")
    s.add_argument("--conversation", "-c", required=True, help="conversation id")
    s.add_argument("--message-id", help="your own id (idempotent: the same id twice is one turn)")
    s.add_argument("--queue", help="queue to use (default: the live queue)")
    s.add_argument("text", help="the message text ('-' reads it from stdin)")
    s.set_defaults(func=cmd_send)
    w = sub.add_parser("wait", help="wait for a message to finish; prints the turn")
    w.add_argument("message_id")
    w.add_argument("--timeout", type=float, default=120.0, help="seconds (default 120)")
    w.set_defaults(func=cmd_wait)
    sh = sub.add_parser("show", help="print a conversation's turns in submission order")
    sh.add_argument("conversation_id")
    sh.set_defaults(func=cmd_show)
    d = sub.add_parser("dead-letters", help="print task messages that could not be processed, and why")
    d.add_argument("--limit", type=int, default=20)
    d.set_defaults(func=cmd_dead)
    try:
        from producer.bulk import add_parser as add_bulk
    except ImportError:  # pragma: no cover
        pass
    else:
        add_bulk(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if getattr(a, "text", None) == "-":
        a.text = sys.stdin.read()
    try:
        return int(a.func(a))
    except AllInOneError as e:
        code = next((c for t, c in EXIT.items() if isinstance(e, t)), 1)
        print(f"error: {e}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
