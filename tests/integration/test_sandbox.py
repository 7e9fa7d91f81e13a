from __future__ import annotations

import http.client
import pathlib
import socket
import time
import uuid

import pytest

from tests.sandbox import Sandbox

pytestmark = pytest.mark.integration


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port: int, path: str, timeout: float = 10) -> tuple[int, str]:
    deadline = time.monotonic() + timeout
    while True:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, response.read().decode()
        except ConnectionRefusedError:
            # The server inside is still starting.
            if time.monotonic() > deadline:
                raise

            time.sleep(0.05)
        finally:
            connection.close()


def _journal(sandbox: Sandbox, unit: str, wanted: str, timeout: float = 10) -> str:
    # journald reads a unit's output stream asynchronously, after it ended.
    deadline = time.monotonic() + timeout
    while True:
        text = sandbox.run("journalctl", "-u", unit, "-o", "cat", "--no-pager").stdout
        if wanted in text or time.monotonic() > deadline:
            return text

        time.sleep(0.05)


def test_pid1_is_systemd(sandbox: Sandbox) -> None:
    assert sandbox.run("cat", "/proc/1/comm").stdout.strip() == "systemd"


def test_system_state_running_after_boot(sandbox: Sandbox) -> None:
    state = sandbox.systemctl("is-system-running", check=False).stdout.strip()

    assert state == "running", sandbox.failed_units


def test_transient_unit_output_reaches_journal(sandbox: Sandbox) -> None:
    unit = _unique("ares-echo")
    marker = _unique("hello")

    sandbox.run(
        "systemd-run",
        "--wait",
        f"--unit={unit}",
        "--property=Type=oneshot",
        "--property=StandardOutput=journal",
        "echo",
        marker,
    )

    assert marker in _journal(sandbox, unit, marker)


def test_transient_unit_as_nobody_runs_unprivileged(sandbox: Sandbox) -> None:
    result = sandbox.run(
        "systemd-run",
        "--wait",
        "--collect",
        "--pipe",
        "--quiet",
        "--property=Type=oneshot",
        "--property=User=nobody",
        "id",
        "-un",
    )

    assert result.stdout.strip() == "nobody"


def test_dbus_call_returns_manager_version(sandbox: Sandbox) -> None:
    version = sandbox.systemctl("--version").stdout.split()[1]

    result = sandbox.run(
        "busctl",
        "call",
        "org.freedesktop.systemd1",
        "/org/freedesktop/systemd1",
        "org.freedesktop.DBus.Properties",
        "Get",
        "ss",
        "org.freedesktop.systemd1.Manager",
        "Version",
    )

    assert result.stdout.startswith(f'v s "{version}')


def test_write_visible_inside_not_on_host(sandbox: Sandbox) -> None:
    name = f"/tmp/{_unique('ares-sandbox-write')}"

    sandbox.write(name, "inside\n")

    assert sandbox.run("cat", name).stdout == "inside\n"
    assert not pathlib.Path(name).exists()


def test_loopback_server_inside_reachable_from_host(sandbox: Sandbox) -> None:
    unit = _unique("ares-http")
    port = _free_port()
    sandbox.write("/srv/www/hello.txt", "hello from the sandbox\n")

    sandbox.run(
        "systemd-run",
        f"--unit={unit}",
        "--property=Type=simple",
        "python3",
        "-m",
        "http.server",
        "--bind=127.0.0.1",
        "--directory=/srv/www",
        str(port),
    )
    try:
        status, body = _get(port, "/hello.txt")
    finally:
        sandbox.systemctl("stop", unit, check=False)

    assert (status, body) == (200, "hello from the sandbox\n")


def test_second_sandbox_running_together_stays_apart(sandbox: Sandbox) -> None:
    unit = _unique("ares-twin")
    name = f"/tmp/{_unique('ares-sandbox-apart')}"
    sandbox.write(name, "first\n")

    with Sandbox.boot() as other:
        for each in (sandbox, other):
            each.run("systemd-run", f"--unit={unit}", "sleep", "60")
        twins = [
            each.cgroup / "system.slice" / f"{unit}.service"
            for each in (sandbox, other)
        ]
        both_running = all(twin.is_dir() for twin in twins)
        seen_by_other = other.path(name).exists()

    sandbox.systemctl("stop", unit)

    assert both_running
    assert not seen_by_other
    assert not other.cgroup.exists()
    assert sandbox.run("cat", name).stdout == "first\n"
