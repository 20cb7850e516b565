"""``worker.health``: ready means Redis answers and a worker on the right host has its model loaded."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import fakeredis
import pytest
import redis

from worker.health import EXIT_CODES, check, main, on_host
from worker.store import MemoryStore, RedisStore
from worker.testing import PROJECT_ROOT, ManualClock, free_port

MODEL = "Qwen/Qwen1.5-0.5B-Chat"
HEARTBEAT = {"model": MODEL, "pid": 4242, "tasks": 3, "started_at": 1.0, "load": {"seconds": 9}}


# ------------------------------------------------------------------------------------------------ check()


def test_no_heartbeat_is_not_ready():
    # Given a store no worker has written to
    result = check(MemoryStore())
    # Then Redis is fine but nobody can take a message
    assert result["ok"] is False
    assert result["status"] == "no_worker" and EXIT_CODES[result["status"]] == 1
    assert result["redis"] == "ok" and result["workers"] == []
    assert "model loaded" in result["error"]


def test_a_heartbeat_is_ready_with_its_model_and_pid():
    store = MemoryStore()
    store.heartbeat("allinone-7@web1", HEARTBEAT, ttl=15)

    result = check(store)

    assert result["ok"] is True and result["status"] == "ok" and EXIT_CODES["ok"] == 0
    assert result["workers"] == [
        {"name": "allinone-7@web1", "model": MODEL, "pid": 4242, "tasks": 3, "started_at": 1.0}
    ]
    assert "error" not in result


def test_an_expired_heartbeat_is_not_ready():
    # Given a worker that beat once and then stopped (it died, or its heartbeat thread did)
    clock = ManualClock()
    store = MemoryStore(clock=clock)
    store.heartbeat("allinone-7@web1", HEARTBEAT, ttl=15)
    clock.now += 14.9
    assert check(store)["ok"] is True
    # When its TTL runs out
    clock.now += 0.2
    # Then it no longer counts
    result = check(store)
    assert result["ok"] is False and result["status"] == "no_worker" and result["workers"] == []


def test_a_worker_is_named_anew_at_every_start_and_stays_on_its_host():
    # A restarted container may reuse the hostname and the pid: the new process must not pass for the dead one
    from worker.runtime import worker_name

    first, second = worker_name(), worker_name()
    assert first != second
    assert on_host(first, socket.gethostname()) and not on_host(first, socket.gethostname() + "0")


def test_this_host_counts_only_workers_on_this_machine():
    store = MemoryStore()
    store.heartbeat("allinone-1@web1", HEARTBEAT, ttl=15)
    store.heartbeat("allinone-2@web10", HEARTBEAT, ttl=15)
    store.heartbeat("web2.77", HEARTBEAT, ttl=15)

    web1 = check(store, this_host="web1")
    assert web1["ok"] is True
    assert [w["name"] for w in web1["workers"]] == ["allinone-1@web1"]
    assert web1["other_hosts"] == ["allinone-2@web10", "web2.77"]

    assert [w["name"] for w in check(store, this_host="web2")["workers"]] == ["web2.77"]

    # A healthy worker elsewhere does not make this container healthy
    web3 = check(store, this_host="web3")
    assert web3["ok"] is False and web3["status"] == "no_worker"
    assert "'web3'" in web3["error"]
    # Without the filter, any worker will do
    assert len(check(store)["workers"]) == 3


@pytest.mark.parametrize(
    ("name", "host", "expected"),
    [
        ("allinone-7@web1", "web1", True),
        ("web1.4242", "web1", True),  # worker.runtime's default name: hostname.pid
        ("allinone-7@web1.example.org", "web1", True),
        ("allinone-7@3f2c1a9b8d7e", "3f2c1a9b8d7e", True),  # a container id as hostname
        ("allinone-7@web10", "web1", False),
        ("allinone-7@myweb1", "web1", False),
        ("allinone-7@web-1", "web", False),
    ],
)
def test_on_host_matches_whole_labels_only(name, host, expected):
    assert on_host(name, host) is expected


def test_check_reads_heartbeats_written_to_redis():
    # The Redis store's encoding (one JSON value per hash field) comes back intact
    store = RedisStore(fakeredis.FakeRedis(decode_responses=True), prefix="t")
    assert check(store)["status"] == "no_worker"

    store.heartbeat("allinone-7@web1", HEARTBEAT, ttl=15)
    result = check(store)

    assert result["ok"] is True
    assert result["workers"][0]["model"] == "Qwen/Qwen1.5-0.5B-Chat" and result["workers"][0]["pid"] == 4242


def test_check_reports_redis_down_instead_of_raising():
    client = redis.Redis(port=free_port(), socket_connect_timeout=0.5)
    result = check(RedisStore(client))
    assert result["ok"] is False
    assert result["status"] == "redis_down" and EXIT_CODES[result["status"]] == 2
    assert result["redis"] == "unavailable" and "did not answer" in result["error"]


# ------------------------------------------------------------------------------------------------ the CLI


def _run_cli(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.health", *args],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALLINONE_")}
    env.update(extra)
    return env


def test_cli_exits_2_with_a_clear_message_when_redis_does_not_answer():
    # Given a Redis URL, with a password, where nothing listens
    port = free_port()
    url = f"redis://:s3cret-pw@127.0.0.1:{port}/0"
    # When the healthcheck runs
    out = _run_cli("--json", env=_clean_env(ALLINONE_REDIS_URL=url))
    # Then it exits 2, says which Redis did not answer, and never prints the password
    assert out.returncode == 2, out
    assert f"Redis at redis://:***@127.0.0.1:{port}/0 did not answer" in out.stderr
    assert "s3cret-pw" not in out.stdout + out.stderr
    status = json.loads(out.stdout)
    assert status["status"] == "redis_down" and status["ok"] is False
    assert status["redis_url"] == f"redis://:***@127.0.0.1:{port}/0"


def test_cli_gives_up_after_timeout_on_a_redis_that_accepts_but_never_answers(monkeypatch, capsys):
    # A socket that completes the TCP handshake (the kernel does it) but never replies: a hung Redis.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        monkeypatch.setenv("ALLINONE_REDIS_URL", f"redis://127.0.0.1:{silent.getsockname()[1]}/0")
        started = time.monotonic()
        code = main(["--timeout", "0.5"])
        elapsed = time.monotonic() - started
    assert code == 2
    assert elapsed < 3, f"the healthcheck took {elapsed:.1f} s despite --timeout 0.5"
    assert "did not answer within 0.5 s" in capsys.readouterr().err


def test_cli_refuses_invalid_settings_without_echoing_them(monkeypatch, capsys):
    monkeypatch.setenv("ALLINONE_REDIS_URL", "http://user:s3cret-pw@example.org")
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "invalid settings" in err and "redis_url" in err and "s3cret-pw" not in err


def test_cli_against_a_real_redis(redis_url, monkeypatch, capsys):
    monkeypatch.setenv("ALLINONE_REDIS_URL", redis_url)
    monkeypatch.setenv("ALLINONE_KEY_PREFIX", "healthtest")
    store = RedisStore(redis.Redis.from_url(redis_url, decode_responses=True), prefix="healthtest")

    # Given no worker: exit 1
    assert main(["--json"]) == 1
    assert json.loads(capsys.readouterr().out)["status"] == "no_worker"

    # Given a worker on another machine: ready for the stack, not for this container
    store.heartbeat("allinone-1@some-other-host", HEARTBEAT, ttl=15)
    assert main([]) == 0
    assert capsys.readouterr().out.startswith("ok: 1 worker(s) ready: allinone-1@some-other-host (Qwen/")
    assert main(["--this-host", "--json"]) == 1
    status = json.loads(capsys.readouterr().out)
    assert status["this_host"] == socket.gethostname()
    assert status["other_hosts"] == ["allinone-1@some-other-host"]

    # Given a worker on this machine: ready here too, one JSON line with its model and pid
    store.heartbeat(f"allinone-2@{socket.gethostname()}", HEARTBEAT, ttl=15)
    assert main(["--this-host", "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    status = json.loads(out)
    assert status["ok"] is True and status["redis"] == "ok"
    name = f"allinone-2@{socket.gethostname()}"
    assert status["workers"] == [{"name": name, "model": MODEL, "pid": 4242, "tasks": 3, "started_at": 1.0}]
