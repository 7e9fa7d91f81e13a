"""journald restarted under a followed service log: the stream goes on, with
the lines written after each restart, none twice and none lost."""

from __future__ import annotations

import queue
import re
import threading
import time

import pytest
import requests

from tests.deployd import Deployd

pytestmark = pytest.mark.integration

TICKER_UNIT = """\
[Service]
ExecStart=/bin/sh -c 'i=0; while true; do i=$((i+1)); echo tick $i; sleep 0.2; done'
"""
TICK = re.compile(r"tick (\d+)$")
RESTARTS = 2


@pytest.fixture(scope="module")
def daemon(deployd: Deployd) -> Deployd:
    deployd.sandbox.write("/etc/systemd/system/journald-ticker.service", TICKER_UNIT)
    deployd.sandbox.systemctl("daemon-reload")
    deployd.sandbox.systemctl("restart", "journald-ticker.service")
    deployd.configure('[services.ticker]\nunit = "journald-ticker.service"\n')
    deployd.restart()
    return deployd


def read_events(answer: requests.Response, into: queue.Queue) -> None:
    """Each event of an SSE answer as a dict of its fields, then None at the end."""
    fields: dict[str, str] = {}
    try:
        for raw in answer.iter_lines():
            line = raw.decode()
            if line == "":
                if fields:
                    into.put(fields)
                fields = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(":")
                fields[name] = value[1:] if value.startswith(" ") else value
    except (requests.RequestException, OSError, AttributeError):
        # How the read ends when the test closes the answer from its thread.
        pass
    into.put(None)


def collect(events: queue.Queue, seconds: float) -> list[dict[str, str]]:
    """The events that arrive within ``seconds``."""
    found = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            item = events.get(timeout=left)
        except queue.Empty:
            break
        assert item is not None, "the stream ended"
        found.append(item)
    return found


def ticks(lines: list[str]) -> list[int]:
    return [int(match[1]) for line in lines if (match := TICK.search(line))]


def latest_tick(daemon: Deployd) -> int:
    answer = daemon.get("/api/admin/services/ticker/logs?lines=1", timeout=5)
    assert answer.status_code == 200, answer.text
    return ticks(answer.json()["lines"])[-1]


def journald_pid(daemon: Deployd) -> int:
    shown = daemon.sandbox.systemctl("show", "-P", "MainPID", "systemd-journald")
    return int(shown.stdout)


def test_journald_restart_keeps_a_followed_log_going(daemon: Deployd) -> None:
    answer = daemon.get(
        "/api/admin/services/ticker/logs?follow=1&lines=1", stream=True, timeout=10
    )
    assert answer.status_code == 200, answer.text
    events: queue.Queue = queue.Queue()
    reader = threading.Thread(target=read_events, args=(answer, events), daemon=True)
    reader.start()

    try:
        received = collect(events, 2)
        after_restart = []
        journalds = [journald_pid(daemon)]
        for _ in range(RESTARTS):
            daemon.sandbox.systemctl("restart", "systemd-journald")
            journalds.append(journald_pid(daemon))
            # Written once journald is back, so it has to come through the stream.
            after_restart.append(latest_tick(daemon))
            assert daemon.get("/api/admin/deploys", timeout=5).status_code == 200
            received += collect(events, 3)
    finally:
        answer.close()

    numbers = ticks([item["data"] for item in received])
    cursors = [item["id"] for item in received]
    journal = daemon.get("/api/admin/services/ticker/logs?lines=1000").json()
    in_journal = [n for n in ticks(journal["lines"]) if numbers[0] <= n <= numbers[-1]]

    print(
        f"\njournald pids {journalds}; ticks {numbers[0]}..{numbers[-1]}, "
        f"{len(numbers)} lines; restarts after ticks {after_restart}"
    )
    assert len(set(journalds)) == RESTARTS + 1
    assert [item["event"] for item in received] == ["line"] * len(received)
    assert len(set(cursors)) == len(cursors)
    assert numbers == sorted(set(numbers)), numbers
    for tick in after_restart:
        assert tick in numbers, (tick, numbers)
    assert numbers[-1] >= after_restart[-1] + 5
    # Nothing the journal holds was skipped by the stream.
    assert numbers == in_journal
