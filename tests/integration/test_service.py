"""ares-deployd as systemd sees it: status line, watchdog, reload, stop, socket.

The daemon runs from this checkout under units/ares-deployd.service, hardening
included, in the session's sandbox.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import time
from collections.abc import Callable, Iterator

import pytest

from tests.deployd import CONFIG, ROOT, UNIT, Deployd
from tests.integration.conftest import WORK

pytestmark = pytest.mark.integration

SOCKET_UNIT = "ares-deployd.socket"

TARGETS = f"""
[targets.quick]
working_directory = "{WORK}"
user = "nobody"
steps = ["echo quick"]

[targets.ticking]
working_directory = "{WORK}"
user = "nobody"
steps = ["for i in 1 2 3 4 5 6 7 8 9 10; do echo tick $i; sleep 0.3; done"]

[targets.broken]
working_directory = "{WORK}"
user = "nobody"
steps = ["echo about to fail", "exit 3"]

[targets.cgroups]
working_directory = "{WORK}"
user = "root"
steps = ["mkdir /sys/fs/cgroup/escaped"]

[targets.faraway]
working_directory = "{WORK}"
user = "nobody"
steps = ["true"]
restart = "idle.service"
health_url = "http://127.0.0.2:9/health"
health_timeout = "1s"

[targets.hostname]
working_directory = "{WORK}"
user = "root"
steps = ["hostname escaped"]
"""

NEW_TARGET = f"""
[targets.added]
working_directory = "{WORK}"
user = "nobody"
steps = ["echo added by reload"]
"""


@pytest.fixture(scope="module")
def daemon(deployd: Deployd) -> Deployd:
    deployd.sandbox.write(
        "/etc/systemd/system/idle.service", "[Service]\nExecStart=/bin/sleep infinity\n"
    )
    deployd.sandbox.systemctl("daemon-reload")
    deployd.configure(TARGETS)
    deployd.restart()
    return deployd


def eventually(check: Callable[[], object], timeout: float = 20) -> object:
    """The first true value of ``check()``, polled until ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def show(daemon: Deployd, prop: str, unit: str = UNIT) -> str:
    return daemon.sandbox.systemctl("show", "-P", prop, unit).stdout.strip()


def journal(daemon: Deployd, *args: str) -> str:
    return daemon.sandbox.run(
        "journalctl", "-u", UNIT, "--no-pager", "-o", "cat", *args, check=False
    ).stdout


@contextlib.contextmanager
def drop_in(daemon: Deployd, unit: str, name: str, text: str) -> Iterator[None]:
    path = f"/etc/systemd/system/{unit}.d/{name}.conf"
    daemon.sandbox.write(path, text)
    daemon.sandbox.systemctl("daemon-reload")
    try:
        yield
    finally:
        daemon.sandbox.run("rm", "-f", path)
        daemon.sandbox.systemctl("daemon-reload")


def test_status_line_follows_a_deployment(daemon: Deployd) -> None:
    deployment_id = daemon.deploy("ticking")

    running = eventually(lambda: "1 running: ticking (" in show(daemon, "StatusText"))
    daemon.wait(deployment_id)
    idle = eventually(
        lambda: show(daemon, "StatusText").startswith("Idle; last: ticking success ")
    )

    assert running, show(daemon, "StatusText")
    assert idle, show(daemon, "StatusText")
    status = daemon.sandbox.systemctl("status", UNIT, "--no-pager", check=False)
    assert 'Status: "Idle; last: ticking success ' in status.stdout


def test_journal_has_one_line_at_start_and_end_at_their_priorities(
    daemon: Deployd,
) -> None:
    good = daemon.wait(daemon.deploy("quick"))["id"]
    bad = daemon.wait(daemon.deploy("broken"))["id"]

    everything = journal(daemon, "-p", "info")
    warnings = journal(daemon, "-p", "warning")

    assert f"deployment {good} of quick started in " in everything
    assert f"deployment {good} of quick ended: success in " in everything
    assert f"deployment {bad} of broken ended: failed in " in warnings
    assert "exited with status 3" in warnings
    assert good not in warnings


def test_reload_makes_a_new_target_deployable(daemon: Deployd) -> None:
    daemon.configure(TARGETS + NEW_TARGET)

    daemon.sandbox.systemctl("reload", UNIT)
    # The daemon applies it once the signal has reached it, after kill returned.
    answer = eventually(
        lambda: (
            daemon.post("/api/admin/deploy", json={"target": "added"}).json().get("id")
        )
    )
    done = daemon.wait(answer)

    assert done["status"] == "success"
    assert "added by reload" in done["output"]
    assert show(daemon, "ActiveState") == "active"


def test_reload_of_a_broken_file_fails_and_keeps_the_old_configuration(
    daemon: Deployd,
) -> None:
    daemon.configure(TARGETS)
    daemon.sandbox.systemctl("reload", UNIT)
    broken = TARGETS + NEW_TARGET.replace("user =", "usr =")
    daemon.configure(broken, server="history = -1\n")
    since = daemon.sandbox.run("date", "+%Y-%m-%d %H:%M:%S").stdout.strip()

    reload = daemon.sandbox.systemctl("reload", UNIT, check=False)
    errors = journal(daemon, "-p", "err", "--since", since)
    refused = daemon.post("/api/admin/deploy", json={"target": "added"})
    kept = daemon.wait(daemon.deploy("quick"))

    assert reload.returncode != 0
    assert f"{CONFIG}: server.history: " in errors
    assert f'{CONFIG}: targets.added.usr: unknown key (did you mean "user"?)' in errors
    assert refused.json()["error"] == "unknown_target"
    assert kept["status"] == "success"
    assert show(daemon, "ActiveState") == "active"
    daemon.configure(TARGETS)
    daemon.sandbox.systemctl("reload", UNIT)


def test_reload_leaves_a_running_deployment_alone(daemon: Deployd) -> None:
    deployment_id = daemon.deploy("ticking")
    # A state directory elsewhere would move the running build's log from under
    # it: it waits for a restart.
    daemon.configure(NEW_TARGET, server='state_dir = "/var/lib/elsewhere"\n')
    since = daemon.sandbox.run("date", "+%Y-%m-%d %H:%M:%S").stdout.strip()

    daemon.sandbox.systemctl("reload", UNIT)
    done = daemon.wait(deployment_id)

    assert done["status"] == "success"
    assert "tick 10" in done["output"]
    warnings = journal(daemon, "-p", "warning", "--since", since)
    assert "server.state_dir: a new value takes effect on restart" in warnings
    daemon.configure(TARGETS)
    daemon.sandbox.systemctl("reload", UNIT)


def refused(daemon: Deployd) -> bool:
    try:
        socket.create_connection(("127.0.0.1", daemon.port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def test_stop_finishes_the_request_in_flight_and_exits_zero(daemon: Deployd) -> None:
    body = b'{"target": "ticking"}'
    sock = daemon.partial_post(body, 5)
    time.sleep(0.5)

    daemon.sandbox.systemctl("--no-block", "stop", UNIT)
    stopped_accepting = eventually(lambda: refused(daemon))
    sock.sendall(body[5:])
    answer = http.client.HTTPResponse(sock)
    answer.begin()
    started = json.loads(answer.read())
    sock.close()
    eventually(lambda: show(daemon, "ActiveState") == "inactive")

    assert stopped_accepting
    assert answer.status == 202
    assert show(daemon, "Result") == "success"
    assert show(daemon, "ExecMainStatus") == "0"
    deployment_id = started["id"]
    daemon.start()
    done = daemon.wait(deployment_id)
    assert done["status"] == "success"
    assert "tick 10" in done["output"]


def test_stop_waits_no_longer_than_its_bound(daemon: Deployd) -> None:
    sock = daemon.partial_post(b'{"target": "quick"}', 3)
    time.sleep(0.5)

    daemon.sandbox.systemctl("stop", UNIT)
    ended = sock.recv(65536)
    sock.close()

    assert ended == b""
    assert show(daemon, "Result") == "success"
    assert "stopping after 10s; connections still busy: 1" in journal(daemon)
    daemon.start()


def test_watchdog_restarts_a_frozen_daemon(daemon: Deployd) -> None:
    with drop_in(daemon, UNIT, "watchdog", "[Service]\nWatchdogSec=3s\n"):
        daemon.restart()
        first = show(daemon, "WatchdogTimestampMonotonic")
        pinged = eventually(lambda: show(daemon, "WatchdogTimestampMonotonic") != first)
        restarts = int(show(daemon, "NRestarts"))

        daemon.kill("SIGSTOP")
        restarted = eventually(lambda: int(show(daemon, "NRestarts")) > restarts, 30)
        daemon.wait_ready()

    daemon.restart()
    assert pinged
    assert restarted
    assert "Watchdog timeout" in daemon.journal()


def test_socket_activation_serves_on_the_socket_systemd_holds(
    daemon: Deployd,
) -> None:
    daemon.sandbox.write(
        f"/etc/systemd/system/{SOCKET_UNIT}",
        (ROOT / "units" / SOCKET_UNIT).read_text(),
    )
    listen = f"[Socket]\nListenStream=\nListenStream=127.0.0.1:{daemon.port}\n"
    daemon.stop()
    try:
        with drop_in(daemon, SOCKET_UNIT, "port", listen):
            daemon.sandbox.systemctl("start", SOCKET_UNIT)
            activated = daemon.get("/api/admin/deploys", timeout=30)
            restarted_pid = daemon.main_pid()
            daemon.stop()
            while_stopped = daemon.wait(daemon.deploy("quick"))
            logged = journal(daemon, "-n", "30")
            daemon.sandbox.systemctl("stop", SOCKET_UNIT)
    finally:
        daemon.sandbox.run("rm", "-f", f"/etc/systemd/system/{SOCKET_UNIT}")
        daemon.sandbox.systemctl("daemon-reload")
        daemon.restart()

    assert activated.status_code == 200
    assert restarted_pid != 0
    assert while_stopped["status"] == "success"
    assert f"listening on 127.0.0.1:{daemon.port} (sockets from systemd)" in logged


def test_build_cannot_touch_control_groups_or_host_name(daemon: Deployd) -> None:
    cgroups = daemon.wait(daemon.deploy("cgroups"))
    hostname = daemon.wait(daemon.deploy("hostname"))

    assert cgroups["status"] == "failed"
    assert "Read-only file system" in cgroups["output"]
    assert not daemon.sandbox.path("/sys/fs/cgroup/escaped").exists()
    assert hostname["status"] == "failed"
    assert daemon.sandbox.run("hostname").stdout.strip() != "escaped"


def test_health_check_reaches_only_the_addresses_the_unit_allows(
    daemon: Deployd,
) -> None:
    allowed = daemon.wait(daemon.deploy("faraway"))
    only = "[Service]\nIPAddressAllow=\nIPAddressAllow=127.0.0.1 ::1\n"
    with drop_in(daemon, UNIT, "only-127-0-0-1", only):
        daemon.restart()
        denied = daemon.wait(daemon.deploy("faraway"))
    daemon.restart()

    # Nothing listens there: reached, it refuses; filtered, nothing comes back.
    url = "http://127.0.0.2:9/health"
    assert (
        allowed["reason"]
        == f"health check {url} failed: [Errno 111] Connection refused"
    )
    assert denied["reason"] == f"health check {url} failed: timed out"
