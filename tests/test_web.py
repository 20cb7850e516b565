"""The web app through HTTP clients: in process (httpx's ASGI transport) for statuses and errors, and a real
``python -m producer.web`` (uvicorn) in front of a real worker for the Server-Sent Events."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from producer.aio import AsyncProducer
from producer.web import create_app
from worker.settings import Settings
from worker.store import RedisStore
from worker.testing import RedisServer, WebProcess

pytestmark = pytest.mark.integration


def call(settings: Settings, *requests: tuple[str, str, dict[str, Any]]) -> list[httpx.Response]:
    """Send requests to an app made from ``settings``, in process (no server, no lifespan)."""

    async def go() -> list[httpx.Response]:
        producer = AsyncProducer(settings=settings)
        app = create_app(settings, producer=producer)
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client:
                return [await client.request(method, url, **kw) for method, url, kw in requests]
        finally:
            await producer.aclose()

    return asyncio.run(go())


def test_submit_answers_202_with_the_ids_and_bad_input_422_with_the_reason(redis_url):
    settings = Settings(redis_url=redis_url, max_message_chars=50)
    ok, again, empty, missing, wrong_type, too_long, bad_id, conflict = call(
        settings,
        ("POST", "/conversations/c1/messages", {"json": {"text": "The room was lovely", "message_id": "m1"}}),
        ("POST", "/conversations/c1/messages", {"json": {"text": "The room was lovely", "message_id": "m1"}}),
        ("POST", "/conversations/c1/messages", {"json": {"text": "  "}}),
        ("POST", "/conversations/c1/messages", {"json": {"txt": "typo"}}),
        ("POST", "/conversations/c1/messages", {"json": {"text": 42}}),
        ("POST", "/conversations/c1/messages", {"json": {"text": "x" * 51}}),
        ("POST", "/conversations/has%20space/messages", {"json": {"text": "hello"}}),
        ("POST", "/conversations/c2/messages", {"json": {"text": "The room was lovely", "message_id": "m1"}}),
    )
    assert ok.status_code == 202
    assert ok.json() == {"message_id": "m1", "conversation_id": "c1", "events": "/messages/m1/events"}
    assert again.status_code == 202 and again.json() == ok.json()  # a retry with the same id is one message
    assert (empty.status_code, empty.json()["detail"]) == (422, "text is empty")
    assert (missing.status_code, missing.json()["detail"]) == (422, "body.text: Field required")
    assert wrong_type.status_code == 422 and wrong_type.json()["detail"].startswith("body.text: Input should be")
    assert too_long.status_code == 422 and "the limit is 50" in too_long.json()["detail"]
    assert bad_id.status_code == 422 and "whitespace" in bad_id.json()["detail"]
    assert conflict.status_code == 409 and "already submitted to conversation 'c1'" in conflict.json()["detail"]
    stored = RedisStore.from_url(redis_url).get_turn("m1")
    assert stored.status.value == "queued" and stored.enqueued_at is not None


def test_reads_answer_the_stored_turns_and_404_for_unknown_ids(redis_url):
    store = RedisStore.from_url(redis_url)
    store.create_turn("c1", "m1", "hello")
    turn, conv, no_turn, no_conv, no_events, bad_resume, page, script = call(
        Settings(redis_url=redis_url),
        ("GET", "/messages/m1", {}),
        ("GET", "/conversations/c1", {}),
        ("GET", "/messages/nope", {}),
        ("GET", "/conversations/nope", {}),
        ("GET", "/messages/nope/events", {}),
        ("GET", "/messages/m1/events", {"headers": {"Last-Event-ID": "not-an-id"}}),
        ("GET", "/", {}),
        ("GET", "/static/app.js", {}),
    )
    assert turn.json() == store.get_turn("m1").public()
    assert conv.json() == store.get_conversation("c1").public()
    assert [r.status_code for r in (no_turn, no_conv, no_events)] == [404, 404, 404]
    assert "no turn with message id 'nope'" in no_events.json()["detail"]
    assert bad_resume.status_code == 422 and "is not an event id" in bad_resume.json()["detail"]
    assert page.status_code == 200 and "<title>allinone" in page.text and "/static/app.js" in page.text
    assert script.status_code == 200 and "EventSource" in script.text


def test_with_redis_stopped_requests_answer_503_within_100_ms():
    server = RedisServer().start()
    settings = Settings(redis_url=server.url)

    async def go() -> None:
        producer = AsyncProducer(settings=settings)
        app = create_app(settings, producer=producer)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client:
            assert (await client.get("/healthz")).status_code == 200
            server.stop()
            for method, url, body in [
                ("GET", "/healthz", None),
                ("POST", "/conversations/c1/messages", {"text": "hello"}),
                ("GET", "/conversations/c1", None),
                ("GET", "/messages/m1/events", None),
            ]:
                t0 = time.perf_counter()
                response = await client.request(method, url, json=body)
                assert time.perf_counter() - t0 < 0.1, url
                assert response.status_code == 503 and response.headers["retry-after"] == "1"
                assert response.json()["detail"].startswith("Redis did not answer")
            assert (await client.get("/")).status_code == 200  # what needs no Redis is served as ever
        await producer.aclose()

    try:
        asyncio.run(go())
    finally:
        server.stop()


def test_metrics_name_what_the_app_counted(redis_url):
    *_, metrics = call(
        Settings(redis_url=redis_url),
        ("POST", "/conversations/c1/messages", {"json": {"text": "hello"}}),
        ("GET", "/messages/nope", {}),
        ("GET", "/metrics", {}),
    )
    text = metrics.text
    assert 'allinone_web_requests_total{handler="submit",status="202"} 1.0' in text
    assert 'allinone_web_requests_total{handler="message",status="404"} 1.0' in text
    assert "allinone_web_submit_seconds_count 1.0" in text and "allinone_web_sse_clients 0.0" in text


# ----------------------------------------------------------------------------- SSE through a real server


@pytest.fixture(scope="module")
def web(tiny_worker) -> Iterator[str]:
    server = WebProcess(env=tiny_worker.env).start()
    yield server.url
    server.stop()


def sse(client: httpx.Client, url: str, headers: dict[str, str] | None = None, stop_after: int | None = None):
    """The events of an SSE response as (id, event, data) tuples; with ``stop_after``, hang up after that many."""
    out: list[tuple[str, str, dict]] = []
    with client.stream("GET", url, headers=headers or {}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        fields: dict[str, str] = {}
        for line in response.iter_lines():
            if line.startswith(":"):
                continue  # a ping
            if line:
                name, _, value = line.partition(": ")
                fields[name] = value
                continue
            if "event" in fields:
                out.append((fields["id"], fields["event"], json.loads(fields["data"])))
                if stop_after is not None and len(out) == stop_after:
                    break
            fields = {}
    return out


def submit(client: httpx.Client) -> str:
    r = client.post(f"/conversations/c-{uuid.uuid4().hex[:6]}/messages", json={"text": "The staff were friendly"})
    assert r.status_code == 202
    return r.json()["message_id"]


def test_sse_sends_every_event_in_order_with_the_stream_ids_then_closes(web):
    with httpx.Client(base_url=web, timeout=30) as client:
        mid = submit(client)
        got = sse(client, f"/messages/{mid}/events")
        kinds = [kind for _, kind, _ in got]
        assert kinds[:2] == ["queued", "classified"] and kinds[-1] == "done" and set(kinds[2:-1]) == {"token"}
        turn = client.get(f"/messages/{mid}").json()
        assert got[-1][2]["reply"] == turn["reply"] and got[1][2]["label"] == turn["sentiment"]["label"]
        ids = [i for i, _, _ in got]
        assert len(set(ids)) == len(ids)
        # Last-Event-ID past the last event: nothing to send, and 204 tells a browser to stop reconnecting
        assert client.get(f"/messages/{mid}/events", headers={"Last-Event-ID": ids[-1]}).status_code == 204


def test_a_client_that_hangs_up_and_reconnects_with_last_event_id_gets_exactly_what_it_missed(web):
    with httpx.Client(base_url=web, timeout=30) as client:
        mid = submit(client)
        first = sse(client, f"/messages/{mid}/events", stop_after=1)  # hangs up after the first event
        rest = sse(client, f"/messages/{mid}/events", headers={"Last-Event-ID": first[-1][0]})
        everything = sse(client, f"/messages/{mid}/events")
        assert first + rest == everything
        # ?after= does the same for clients that cannot set the header
        assert sse(client, f"/messages/{mid}/events?after={everything[1][0]}") == everything[2:]


def test_a_client_that_hangs_up_while_its_stream_waits_leaves_nothing_running(web, tiny_worker):
    # Given a turn nothing will ever answer (stored, never enqueued), followed by a client
    RedisStore.from_url(tiny_worker.env["ALLINONE_REDIS_URL"]).create_turn("c-wait", "never-sent", "anyone there?")
    with httpx.Client(base_url=web, timeout=30) as client:
        with client.stream("GET", "/messages/never-sent/events") as response:
            lines = response.iter_lines()  # kept: a dropped iterator closes the response
            assert next(lines).startswith("id: ")
            assert "allinone_web_sse_clients 1.0" in client.get("/metrics").text  # the server is following it
        # When the client hangs up while the server blocks on the stream for the next event (above, and here)
        assert [kind for _, kind, _ in sse(client, "/messages/never-sent/events", stop_after=1)] == ["queued"]
        # Then the server ends that stream at once, instead of reading on for nobody
        t0 = time.monotonic()
        while "allinone_web_sse_clients 0.0" not in client.get("/metrics").text:
            assert time.monotonic() - t0 < 3, "an event stream outlived its client"
            time.sleep(0.05)
