"""The web app: an example front door users copy, and the compose stack's ``web`` service (the ``web`` extra:
fastapi, uvicorn, sse-starlette; ``metrics`` for /metrics: prometheus-client).

    python -m producer.web [--host 127.0.0.1] [--port 8000]

What lives where:

- ``app``: ``create_app(settings, producer)``: the routes (submit, events as Server-Sent Events, turn,
  conversation, health, metrics, the page) and how errors become HTTP statuses.
- ``metrics``: the app's Prometheus metrics and the middleware that counts requests.
- ``static/``: the chat page (``index.html``, ``app.js``): no build step, nothing fetched from elsewhere.
- ``__main__``: runs the app under uvicorn.
"""

from producer.web.app import create_app

__all__ = ["create_app"]
