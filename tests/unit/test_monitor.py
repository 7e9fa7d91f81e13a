"""Service status from unit state and health, and listening ports from /proc."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from ares_deployd import sockets
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


def table_row(number: int, local: str, remote: str, state: str, inode: str) -> str:
    timers = "00000000:00000000 00:00000000 00000000"
    return f"{number:4}: {local} {remote} {state} {timers} 0 0 {inode} 1 0"


TABLE = "\n".join(
    [
        "  sl  local_address rem_address   st tx_queue rx_queue ... inode",
        table_row(0, "0100007F:1F90", "00000000:0000", "0A", "1111"),
        table_row(1, "0100007F:1F91", "00000000:0000", "0A", "2222"),
        table_row(2, "0100007F:A000", "0100007F:1F90", "01", "3333"),
    ]
)


def test_listening_in_table_keeps_listening_sockets() -> None:
    assert sockets.listening_in_table(TABLE) == {"1111": 8080, "2222": 8081}


def test_cgroup_pids_reads_nested_groups(tmp_path: Path) -> None:
    (tmp_path / "cgroup.procs").write_text("10\n11\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "cgroup.procs").write_text("12\n")

    assert sorted(sockets.cgroup_pids(tmp_path)) == [10, 11, 12]
    assert sockets.cgroup_pids(tmp_path / "missing") == []


def test_listening_ports_finds_a_socket_this_process_listens_on() -> None:
    with socket.socket() as listening, socket.socket() as bound_only:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        bound_only.bind(("127.0.0.1", 0))
        ports = listening.getsockname()[1], bound_only.getsockname()[1]

        found = sockets.listening_ports({"me": [os.getpid()], "nobody": []})

    assert ports[0] in found["me"]
    assert ports[1] not in found["me"]
    assert found["nobody"] == []
