"""Event streams against a real systemd: build output live, journal lines live."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import pytest
import requests

from tests.deployd import Deployd
from tests.integration.conftest import WORK

pytestmark = pytest.mark.integration

CAP = 3
TICKS = 15

TARGETS = f"""
[targets.ticking]
working_directory = "{WORK}"
user = "nobody"
steps = [
    "for i in $(seq 1 {TICKS}); do echo tick $i; sleep 0.2; done",
    "echo done ticking",
]

[targets.quick]
working_directory = "{WORK}"
user = "nobody"
steps = ["echo one; echo two", "printf 'no newline at the end'"]

[targets.endless]
working_directory = "{WORK}"
user = "root"
steps = ["echo running; sleep 300"]

[services.chatty]
unit = "chatty.service"
"""

CHATTY = """\
[Service]
ExecStart=/bin/sh -c 'i=0; while true; do i=$((i+1)); echo chat $i; sleep 0.2; done'
"""


@pytest.fixture(scope="module")
def daemon(deployd: Deployd) -> Deployd:
    deployd.sandbox.write("/etc/systemd/system/chatty.service", CHATTY)
    deployd.sandbox.systemctl("daemon-reload")
    deployd.sandbox.systemctl("restart", "chatty.service")
    deployd.configure(TARGETS, server=f"max_streams = {CAP}\n")
    deployd.restart()
    return deployd


def events(response: requests.Response) -> Iterator[dict[str, str]]:
    """The events of an SSE answer as they arrive, comments left out."""
    fields: dict[str, str] = {}
    for raw in response.iter_lines(decode_unicode=False):
        line = raw.decode()
        if line == "":
            if fields:
                yield fields
            fields = {}
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "data" and "data" in fields:
                fields["data"] += "\n" + value
            else:
                fields[name] = value


def open_stream(
    daemon: Deployd, path: str, timeout: float = 30, **headers: str
) -> requests.Response:
    return daemon.http.get(
        daemon.base_url + path, stream=True, timeout=timeout, headers=headers
    )


def test_events_deliver_lines_while_the_build_runs(daemon: Deployd) -> None:
    deployment_id = daemon.deploy("ticking")
    started = time.monotonic()

    with open_stream(daemon, f"/api/admin/deploy/{deployment_id}/events") as stream:
        assert stream.status_code == 200
        assert stream.headers["Content-Type"].startswith("text/event-stream")
        assert stream.headers["Cache-Control"] == "no-cache"
        assert stream.headers["X-Accel-Buffering"] == "no"
        first_tick_after = None
        received = []
        for item in events(stream):
            if item.get("event") == "output" and item["data"] == "tick 1":
                first_tick_after = time.monotonic() - started
            received.append(item)
        ended_after = time.monotonic() - started

    output = [item["data"] for item in received if item["event"] == "output"]
    ticks = [line for line in output if line.startswith("tick ")]
    assert ticks == [f"tick {n}" for n in range(1, TICKS + 1)]
    assert "done ticking" in output
    assert first_tick_after is not None
    # The build takes about three seconds: the first line must not wait for it.
    assert first_tick_after < ended_after - 2
    assert received[-1]["event"] == "status"
    status = json.loads(received[-1]["data"])
    assert status["id"] == deployment_id
    assert status["status"] == "success"
    assert status["finished_at"] is not None


def test_events_ids_are_the_offsets_of_the_lines_in_the_log(daemon: Deployd) -> None:
    deployment_id = daemon.deploy("quick")
    daemon.wait(deployment_id)
    log = daemon.get(f"/api/admin/deploy/{deployment_id}/log").content

    with open_stream(daemon, f"/api/admin/deploy/{deployment_id}/events") as stream:
        received = list(events(stream))

    output = [item for item in received if item["event"] == "output"]
    for item in output:
        line = log[int(item["id"]) :].split(b"\n", 1)[0]
        assert line.decode() == item["data"]
    # A finished deployment replays its whole output.
    assert "\n".join(item["data"] for item in output) == log.decode().rstrip("\n")
    assert any("no newline at the end" in item["data"] for item in output)
    assert json.loads(received[-1]["data"])["status"] == "success"


def test_events_resume_after_last_event_id_without_loss_or_repeat(
    daemon: Deployd,
) -> None:
    deployment_id = daemon.deploy("ticking")
    path = f"/api/admin/deploy/{deployment_id}/events"
    first: list[dict[str, str]] = []
    with open_stream(daemon, path) as stream:
        for item in events(stream):
            first.append(item)
            if item.get("data") == "tick 4":
                break

    with open_stream(daemon, path, **{"Last-Event-ID": first[-1]["id"]}) as stream:
        second = list(events(stream))

    lines = [item["data"] for item in first + second if item["event"] == "output"]
    ticks = [line for line in lines if line.startswith("tick ")]
    assert ticks == [f"tick {n}" for n in range(1, TICKS + 1)]
    assert len(lines) == len(set(lines))
    assert second[-1]["event"] == "status"


def test_events_of_a_quiet_build_keep_the_stream_alive(daemon: Deployd) -> None:
    deployment_id = daemon.deploy("endless")
    path = f"/api/admin/deploy/{deployment_id}/events"

    seen: list[tuple[float, bytes]] = []
    with open_stream(daemon, path) as stream:
        begun = time.monotonic()
        for raw in stream.iter_lines():
            seen.append((time.monotonic() - begun, raw))
            if raw.startswith(b":") or time.monotonic() - begun > 25:
                break
    daemon.post(f"/api/admin/deploy/{deployment_id}/cancel")
    daemon.wait(deployment_id)

    # Nothing but its first lines, then a comment before proxies give up on it.
    assert seen[-1][1] == b": keep-alive", seen
    assert 10 < seen[-1][0] < 20, seen


def test_events_bad_last_event_id_is_400(daemon: Deployd) -> None:
    deployment_id = daemon.deploy("quick")
    path = f"/api/admin/deploy/{deployment_id}/events"

    answer = daemon.get(path, headers={"Last-Event-ID": "twelve"})
    daemon.wait(deployment_id)

    assert answer.status_code == 400
    assert answer.json()["error"] == "bad_last_event_id"


def test_events_need_the_secret_and_a_known_id(daemon: Deployd) -> None:
    deployment_id = daemon.deploy("quick")
    path = f"/api/admin/deploy/{deployment_id}/events"

    refused = requests.get(daemon.base_url + path, timeout=10)
    unknown = daemon.get(
        "/api/admin/deploy/00000000-0000-4000-8000-000000000000/events"
    )

    assert refused.status_code == 401
    assert refused.json()["error"] == "unauthorized"
    assert unknown.status_code == 404


def _thread_count(daemon: Deployd) -> int:
    status = daemon.sandbox.run("cat", f"/proc/{daemon.main_pid()}/status").stdout
    return int(status.split("Threads:")[1].split()[0])


def _open_files(daemon: Deployd) -> int:
    listing = daemon.sandbox.run("ls", f"/proc/{daemon.main_pid()}/fd").stdout
    return len(listing.split())


def test_streams_past_the_cap_are_refused_and_others_still_served(
    daemon: Deployd,
) -> None:
    deployment_id = daemon.deploy("endless")
    path = f"/api/admin/deploy/{deployment_id}/events"
    threads_before = _thread_count(daemon)
    files_before = _open_files(daemon)
    held = [open_stream(daemon, path) for _ in range(CAP)]
    try:
        assert [stream.status_code for stream in held] == [200] * CAP

        refused = daemon.get(path)
        listed = daemon.get("/api/admin/deploys", timeout=5)

        assert refused.status_code == 503
        assert refused.json()["error"] == "too_many_streams"
        assert int(refused.headers["Retry-After"]) > 0
        assert listed.status_code == 200
    finally:
        for stream in held:
            stream.close()

    # The dropped clients' places, threads and files come back within seconds:
    # as many streams open again, each answered by a thread of the pool at once,
    # and no thread was made for them beyond waitress's fixed pool.
    deadline = time.monotonic() + 10
    while _open_files(daemon) > files_before:
        assert time.monotonic() < deadline, "closed streams kept their files open"
        time.sleep(0.2)
    again = [open_stream(daemon, path, timeout=5) for _ in range(CAP)]
    assert [stream.status_code for stream in again] == [200] * CAP
    for stream in again:
        stream.close()
    assert _thread_count(daemon) == threads_before
    daemon.post(f"/api/admin/deploy/{deployment_id}/cancel")
    daemon.wait(deployment_id)


def _journalctl_children(daemon: Deployd) -> list[str]:
    found = daemon.sandbox.run("pgrep", "-x", "journalctl", check=False).stdout
    return found.split()


def test_logs_follow_delivers_new_lines_with_cursors(daemon: Deployd) -> None:
    path = "/api/admin/services/chatty/logs?follow=1&lines=2"

    with open_stream(daemon, path) as stream:
        assert stream.status_code == 200
        assert stream.headers["Content-Type"].startswith("text/event-stream")
        received = []
        for item in events(stream):
            received.append(item)
            if len(received) == 8:
                break

    assert [item["event"] for item in received] == ["line"] * 8, received
    numbers = [int(item["data"].rsplit(" ", 1)[1]) for item in received]
    assert numbers == list(range(numbers[0], numbers[0] + 8))
    assert "chatty" in received[0]["data"] or "sh[" in received[0]["data"]
    assert len({item["id"] for item in received}) == 8
    # The cursor of the last line continues the plain endpoint, once the
    # service has written its next line.
    deadline = time.monotonic() + 10
    while True:
        after = daemon.get(
            "/api/admin/services/chatty/logs", params={"after": received[-1]["id"]}
        ).json()
        if after["lines"] or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert int(after["lines"][0].rsplit(" ", 1)[1]) == numbers[-1] + 1


def test_logs_follow_resumes_after_last_event_id(daemon: Deployd) -> None:
    path = "/api/admin/services/chatty/logs?follow=1&lines=1"
    with open_stream(daemon, path) as stream:
        first = next(events(stream))

    with open_stream(daemon, path, **{"Last-Event-ID": first["id"]}) as stream:
        second = next(events(stream))

    assert int(second["data"].rsplit(" ", 1)[1]) == (
        int(first["data"].rsplit(" ", 1)[1]) + 1
    )


def _wait_for_journalctls(daemon: Deployd, most: int) -> None:
    deadline = time.monotonic() + 10
    while len(_journalctl_children(daemon)) > most:
        assert time.monotonic() < deadline, "journalctl outlived its client"
        time.sleep(0.2)


def test_logs_follow_dropped_client_leaves_no_journalctl(daemon: Deployd) -> None:
    # Those of the streams before this one end within a second of their clients.
    _wait_for_journalctls(daemon, 0)
    sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
    sock.sendall(
        b"GET /api/admin/services/chatty/logs?follow=1 HTTP/1.1\r\nHost: t\r\n"
        + f"X-Admin-Secret: {daemon.secret}\r\n\r\n".encode()
    )
    assert b"200 OK" in sock.recv(4096)
    assert len(_journalctl_children(daemon)) == 1

    sock.close()

    _wait_for_journalctls(daemon, 0)


def test_logs_follow_bad_values_are_400(daemon: Deployd) -> None:
    for query, code in (
        ("follow=maybe", "bad_follow"),
        ("follow=1&after=not-a-cursor", "bad_after"),
        ("follow=1&after=a=0", "bad_after"),
        ("follow=1&lines=0", "bad_lines"),
    ):
        answer = daemon.get(f"/api/admin/services/chatty/logs?{query}")
        assert answer.status_code == 400, query
        assert answer.json()["error"] == code
