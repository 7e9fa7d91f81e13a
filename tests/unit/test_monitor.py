"""Service status from unit state and health, as the API shows it."""

from __future__ import annotations

import pytest

from ares_deployd.config import Service
from ares_deployd.monitor import (
    DEGRADED,
    FAILING,
    PASSING,
    RUNNING,
    STOPPED,
    UNKNOWN,
    Health,
    ServiceView,
    UnitState,
    derive_status,
)


@pytest.mark.parametrize(
    ("active_state", "health", "status"),
    [
        ("active", None, RUNNING),
        ("active", PASSING, RUNNING),
        ("active", UNKNOWN, RUNNING),
        ("active", FAILING, DEGRADED),
        ("activating", None, DEGRADED),
        ("activating", PASSING, DEGRADED),
        ("reloading", None, DEGRADED),
        ("deactivating", None, DEGRADED),
        ("inactive", None, STOPPED),
        ("inactive", FAILING, STOPPED),
        ("failed", None, STOPPED),
    ],
)
def test_derive_status_from_state_and_health(active_state, health, status) -> None:
    assert derive_status(active_state, health) == status


def view(port: int | None = None, **unit: object) -> ServiceView:
    service = Service("web", "web.service", port, "http://127.0.0.1:1/health")
    return ServiceView(service, UnitState(**unit), Health(PASSING), (8080, 9090))


def test_view_summary_has_the_documented_fields() -> None:
    summary = view(
        3000,
        load_state="loaded",
        active_state="active",
        sub_state="running",
        main_pid=12847,
        since=1773410622_000000,
    ).summary()

    assert summary["status"] == "running"
    assert summary["pid"] == 12847
    assert summary["port"] == 3000
    assert summary["since"] == "2026-03-13T14:03:42Z"
    assert summary["health"] == "passing"


def test_view_port_falls_back_to_the_lowest_listening_one() -> None:
    assert view(None, active_state="active").port == 8080
    assert view(None, active_state="active").detail()["listening"] == [8080, 9090]


def test_view_of_missing_unit_says_so_and_is_stopped() -> None:
    summary = view(load_state="not-found").summary()

    assert summary["status"] == "stopped"
    assert summary["load_state"] == "not-found"
    assert summary["pid"] is None
    assert summary["since"] is None


def test_view_oneshot_that_remains_is_running() -> None:
    service = Service("admin", "admin.service", None, None)
    state = UnitState("loaded", "active", "exited")

    summary = ServiceView(service, state, None, ()).summary()

    assert (summary["status"], summary["pid"], summary["port"]) == (
        "running",
        None,
        None,
    )
