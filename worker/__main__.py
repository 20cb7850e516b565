"""``python -m worker [celery worker options]``: a worker with the pool and concurrency torch on CPU wants.

One process (solo pool), one task at a time, the model loaded once before the first message, torch using
ALLINONE_THREADS threads. More throughput means more workers (more machines against the same Redis), not more
concurrency in one: two forward passes on the same cores only slow each other down.
Extra arguments go to ``celery worker`` as they are (``--loglevel DEBUG``, ``-Q live`` for a live-only worker...).
"""

from __future__ import annotations

import os
import sys

from worker.settings import get_settings


def main(argv: list[str] | None = None) -> None:
    s = get_settings()
    extra = list(sys.argv[1:] if argv is None else argv)
    args = ["worker", "--pool", "solo", "--concurrency", "1", "--without-gossip", "--without-mingle"]
    if not any(a in ("-Q", "--queues") or a.startswith("--queues=") for a in extra):
        args += ["-Q", f"{s.live_queue},{s.bulk_queue}"]
    if not any(a in ("-l", "--loglevel") or a.startswith("--loglevel=") for a in extra):
        args += ["--loglevel", "INFO"]
    if not any(a in ("-n", "--hostname") or a.startswith("--hostname=") for a in extra):
        # the pid keeps two workers on one host apart (Celery refuses duplicate node names)
        args += ["--hostname", f"allinone-{os.getpid()}@%h"]
    from worker.app import app

    app.worker_main(argv=args + extra)


if __name__ == "__main__":
    main()
