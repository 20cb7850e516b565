"""The web app: a FastAPI front door over :class:`~producer.AsyncProducer`.

    POST /conversations/{conversation_id}/messages   {"text": ..., "message_id"?: ...}  -> 202 {"message_id", ...}
    GET  /messages/{message_id}/events               Server-Sent Events: queued, classified, token..., done|failed
    GET  /messages/{message_id}                      the turn
    GET  /conversations/{conversation_id}            every turn, in submission order
    GET  /healthz                                    200 when Redis answers, else 503
    GET  /metrics                                    Prometheus metrics of this process
    GET  /                                           a chat page (static/index.html)

Errors are JSON ``{"detail": reason}``: 422 bad input (with what is wrong), 404 unknown id, 409 a message id
reused for another message, 503 Redis or the broker away (with ``Retry-After``). Nothing here waits on a socket
outside the event loop: the store is ``redis.asyncio``, the Celery publish runs on a thread with a time bound.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from sse_starlette import EventSourceResponse, ServerSentEvent

from producer.aio import AsyncProducer
from producer.web.metrics import RequestMetrics, WebMetrics
from worker.errors import (
    InvalidMessage,
    MessageIdConflict,
    StoreUnavailable,
    UnknownConversation,
    UnknownMessage,
)
from worker.events import Event, check_event_id
from worker.settings import Settings, get_settings

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"

# SSE comment lines this often keep proxies from closing a quiet stream (a reply waiting behind a long queue).
PING_SECONDS = 15
# How long a browser waits before it reconnects a dropped stream (it resumes with Last-Event-ID).
RETRY_MS = 1000

_STATUS = {InvalidMessage: 422, MessageIdConflict: 409, UnknownMessage: 404, UnknownConversation: 404,
           StoreUnavailable: 503}


class MessageIn(BaseModel):
    """The body of a submit."""

    text: str = Field(description="The message; not blank, at most ALLINONE_MAX_MESSAGE_CHARS characters.")
    message_id: str | None = Field(
        None, description="Your id for this message: sending the same id again (a retry) is one message."
    )


class Accepted(BaseModel):
    message_id: str
    conversation_id: str
    events: str = Field(description="Where the message's events are (Server-Sent Events).")


def create_app(settings: Settings | None = None, producer: AsyncProducer | None = None) -> FastAPI:
    """The app, on ``producer`` (one is made from ``settings`` when not given, and closed with the app)."""
    settings = settings or get_settings()
    owned = producer is None
    prod = producer or AsyncProducer(settings)
    metrics = WebMetrics()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        if owned:
            await prod.aclose()

    app = FastAPI(title="allinone", summary="Sentiment and a chat reply for every message", lifespan=lifespan)
    app.state.producer = prod
    app.state.metrics = metrics
    app.add_middleware(RequestMetrics, metrics=metrics)

    # ------------------------------------------------------------------------------------------------ errors
    for error, status in _STATUS.items():

        async def handle(_: Request, e: Exception, status: int = status) -> JSONResponse:
            headers = {"Retry-After": "1"} if status == 503 else None
            return JSONResponse({"detail": str(e)}, status_code=status, headers=headers)

        app.add_exception_handler(error, handle)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, e: RequestValidationError) -> JSONResponse:
        # One readable sentence per problem ("body.text: Field required"), and pydantic's list for programs.
        reasons = [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
        return JSONResponse({"detail": "; ".join(reasons), "errors": json.loads(json.dumps(e.errors(), default=str))},
                            status_code=422)

    # ------------------------------------------------------------------------------------------------ routes
    @app.post("/conversations/{conversation_id}/messages", status_code=202, response_model=Accepted)
    async def submit(conversation_id: str, body: MessageIn) -> Accepted:
        with metrics.submit_seconds.time():
            mid = await prod.submit(conversation_id, body.text, message_id=body.message_id)
        return Accepted(message_id=mid, conversation_id=conversation_id, events=f"/messages/{mid}/events")

    @app.get("/messages/{message_id}/events", response_model=None)
    async def message_events(
        message_id: str,
        after: str | None = Query(None, description="Resume after this event id (Last-Event-ID wins)."),
        last_event_id: str | None = Header(None),
    ) -> Response:
        resume = last_event_id or after or "0"
        try:
            check_event_id(resume)
        except ValueError as e:
            raise InvalidMessage(str(e)) from None
        turn = await prod.turn(message_id)  # 404 before the stream starts, not an empty stream
        if turn.status.terminal and not await prod.store.read_events(message_id, resume):
            # Everything was heard already (a browser reconnecting after the last event): 204 tells an
            # EventSource to stop reconnecting.
            return Response(status_code=204)
        return EventSourceResponse(_sse(prod, metrics, message_id, resume), ping=PING_SECONDS)

    @app.get("/messages/{message_id}")
    async def message(message_id: str) -> dict[str, Any]:
        return (await prod.turn(message_id)).public()

    @app.get("/conversations/{conversation_id}")
    async def conversation(conversation_id: str) -> dict[str, Any]:
        return (await prod.conversation(conversation_id)).public()

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        await prod.ping()
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


async def _sse(prod: AsyncProducer, metrics: WebMetrics, message_id: str, after: str) -> AsyncIterator[Any]:
    """The turn's events as SSE: ``id:`` the stream id, ``event:`` its type, ``data:`` its JSON; ends after the
    terminal event. A client that goes away cancels this generator (sse-starlette), which closes the read."""
    metrics.sse_clients.inc()
    try:
        first = True
        async for event in prod.events(message_id, after):
            yield _message(event, retry=RETRY_MS if first else None)
            metrics.sse_events.labels(event.type).inc()
            first = False
    except StoreUnavailable as e:
        # Redis went away mid-stream: end it; the browser reconnects with Last-Event-ID and resumes.
        log.warning("events of %s: stream ended, Redis away: %s", message_id, e)
        return
    finally:
        metrics.sse_clients.dec()


def _message(event: Event, retry: int | None = None) -> ServerSentEvent:
    return ServerSentEvent(
        data=json.dumps(event.data, ensure_ascii=False), event=event.type, id=event.id, retry=retry
    )
