"""``python -m producer``: send messages, wait for them, show conversations, back-process files.

    python -m producer send --conversation ID TEXT      -> {"message_id": ..., "conversation_id": ...}
    python -m producer send --follow -c ID TEXT         -> the same, then the sentiment and the reply as it is written
    python -m producer follow MESSAGE_ID [--after ID]   -> a sent message's sentiment and reply as it is written
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
    if a.follow:
        sys.stdout.flush()
        return _follow(p, mid, "0", a.timeout, as_json=False)
    return 0


def cmd_follow(a: argparse.Namespace) -> int:
    return _follow(_producer(), a.message_id, a.after, a.timeout, as_json=a.json)


def _follow(p: Any, message_id: str, after: str, timeout: float, as_json: bool) -> int:
    """Print a turn's events as they come: as JSON lines, or as a person reads them (the reply as it is
    written; a restart starts the reply over on a new line)."""
    code, streamed = 0, False
    for event in p.events(message_id, after=after, timeout=timeout):
        if as_json:
            _print(event.public())
        elif event.type == "classified":
            print(f"[{event.data['label']} {event.data['confidence']:.2f}]", flush=True)
        elif event.type == "token":
            print(event.data["text"], end="", flush=True)
            streamed = True
        elif event.type == "restart":
            print(f"\n[restarted: attempt {event.data['attempt']}]", flush=True)
            streamed = False
        elif event.type == "done":
            # Streamed, the reply is on the screen already (its pieces joined are the stored reply, give or take
            # surrounding whitespace); not streamed (token events off, a bulk turn), it is printed whole here.
            print("" if streamed else event.data["reply"], flush=True)
        elif event.type == "failed":
            print(f"error: {event.data['reason']}", file=sys.stderr)
        if event.type == "failed":
            code = 1
    return code


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
    s.add_argument("--follow", "-f", action="store_true", help="then print its sentiment and reply as it is written")
    s.add_argument("--timeout", type=float, default=120.0, help="with --follow: seconds (default 120)")
    s.add_argument("text", help="the message text ('-' reads it from stdin)")
    s.set_defaults(func=cmd_send)
    f = sub.add_parser("follow", help="print a message's sentiment and reply as it is written (its events)")
    f.add_argument("message_id")
    f.add_argument("--after", default="0", help="resume after this event id (default: from the first event)")
    f.add_argument("--json", action="store_true", help="every event as a JSON line {id, type, data}")
    f.add_argument("--timeout", type=float, default=120.0, help="seconds (default 120)")
    f.set_defaults(func=cmd_follow)
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
