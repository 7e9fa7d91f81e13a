"""The status line systemd shows, and when the watchdog wants pings."""

from __future__ import annotations

import os

import pytest

from ares_deployd.store import Deployment
from ares_deployd.supervision import ago, status_line, watchdog_interval

NOW = 1_800_000_000.0


def deployment(target: str, status: str, started: float, finished=None) -> Deployment:
    return Deployment(
        seq=1,
        id=f"{target}-id",
        target=target,
        status=status,
        unit=f"ares-deploy-{target}.service",
        started=started,
        finished=finished,
        phase="build",
        reason=None,
        exit_status=None,
        failed_step=None,
        cancel_requested=0,
        ref=None,
        revision_before=None,
        revision=None,
        rollback_of=None,
        rolled_back_by=None,
    )


def test_status_line_running_names_each_target_with_its_time() -> None:
    running = [
        deployment("ares", "running", NOW - 72),
        deployment("eruka", "running", NOW - 5),
    ]

    line = status_line("127.0.0.1:3001", running, running[-1], NOW)

    assert line == "Listening on 127.0.0.1:3001; 2 running: ares (1m12s), eruka (5s)"


def test_status_line_idle_tells_the_last_deployment() -> None:
    last = deployment("eruka", "success", NOW - 400, finished=NOW - 180)

    assert status_line("127.0.0.1:3001", [], last, NOW) == (
        "Idle; last: eruka success 3 min ago"
    )


def test_status_line_without_history_tells_the_address() -> None:
    assert status_line("[::1]:3001", [], None, NOW) == (
        "Idle; listening on [::1]:3001; no deployments yet"
    )


@pytest.mark.parametrize(
    ("seconds", "said"),
    [(0, "0s ago"), (59, "59s ago"), (60, "1 min ago"), (3599, "59 min ago"),
     (7200, "2 h ago"), (3 * 86400, "3 days ago"), (-5, "0s ago")],
)  # fmt: skip
def test_ago_reads_like_speech(seconds: float, said: str) -> None:
    assert ago(seconds) == said


def test_watchdog_interval_is_half_the_timeout(monkeypatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))

    assert watchdog_interval() == 15.0


@pytest.mark.parametrize(
    "env",
    [{}, {"WATCHDOG_USEC": "0"}, {"WATCHDOG_USEC": "x"},
     {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}],
)  # fmt: skip
def test_watchdog_interval_none_when_not_for_us(monkeypatch, env) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)

    assert watchdog_interval() is None
