"""``python -m producer.web [--host H] [--port P]``: the web app under uvicorn (settings from ALLINONE_*)."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m producer.web", description=__doc__)
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 in a "
                    "container)")
    ap.add_argument("--port", type=int, default=8000, help="default 8000")
    ap.add_argument("--log-level", default="info")
    a = ap.parse_args(argv)
    import resource

    import uvicorn

    # Each SSE client holds a socket, and a Redis connection while it waits: allow as many files as the system does.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    from producer.web.app import create_app

    # One process: SSE followers are cheap coroutines; for more, run more processes behind a load balancer.
    uvicorn.run(create_app(), host=a.host, port=a.port, log_level=a.log_level, timeout_graceful_shutdown=5)


if __name__ == "__main__":
    main()
