"""Faults on purpose: the daemon killed, the bus restarted, the disk full.

Each ends with every deployment in a correct final state, its output complete, the
history intact and the API answering.
"""

from __future__ import annotations

import time

import pytest

from tests.deployd import ROOT, STATE, Deployd, free_port
from tests.integration.conftest import WORK

pytestmark = pytest.mark.integration


CHECKED_PORT = free_port()

TARGETS = f"""
[targets.checked]
working_directory = "{WORK}"
user = "nobody"
steps = ["echo built"]
restart = "checked.service"
health_url = "http://127.0.0.1:{CHECKED_PORT}/health"
health_timeout = "60s"

[targets.slowstart]
working_directory = "{WORK}"
user = "nobody"
steps = ["echo built"]
restart = "slowstart.service"

[targets.ticks]
working_directory = "{WORK}"
user = "root"
steps = ["for i in 1 2 3 4 5 6 7 8 9 10 11 12; do echo tick $i; sleep 0.25; done"]

[targets.forker]
working_directory = "{WORK}"
user = "root"
steps = ["setsid nohup sleep 301 >/dev/null 2>&1 & echo forked; sleep 300"]

[targets.forker_slow]
working_directory = "{WORK}"
user = "root"
timeout = "2s"
steps = ["setsid nohup sleep 302 >/dev/null 2>&1 & echo forked; sleep 300"]

[targets.flood]
working_directory = "{WORK}"
user = "nobody"
steps = ["head -c 6000000 /dev/zero | tr '\\\\0' 'x' | fold -w 99"]
"""

# Its start takes a while, so the daemon can be killed in the middle of it.
SLOW_UNIT = """\
[Service]
ExecStartPre=/bin/sleep 3
ExecStart=/bin/sleep infinity
"""


# Unhealthy while the file exists, so that a deployment waits in its health check.
CHECKED_UNIT = f"""\
[Service]
ExecStart=/usr/bin/python3 {ROOT}/examples/demo/server.py {CHECKED_PORT} checked
Environment=UNHEALTHY_FILE=/run/checked-unhealthy
"""


@pytest.fixture(scope="module")
def daemon(deployd: Deployd) -> Deployd:
    deployd.sandbox.write("/etc/systemd/system/slowstart.service", SLOW_UNIT)
    deployd.sandbox.write("/etc/systemd/system/checked.service", CHECKED_UNIT)
    deployd.sandbox.systemctl("daemon-reload")
    deployd.configure(TARGETS)
    deployd.restart()
    return deployd


def wait_for_phase(daemon: Deployd, deployment_id: str, phase: str) -> None:
    deadline = time.monotonic() + 30
    while daemon.get(f"/api/admin/deploy/{deployment_id}").json()["phase"] != phase:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def wait_for_new_daemon(daemon: Deployd, old_pid: int) -> None:
    """Wait until systemd has started the daemon again and it answers."""
    deadline = time.monotonic() + 30
    while daemon.main_pid() in (0, old_pid):
        assert time.monotonic() < deadline, daemon.journal()[-3000:]
        time.sleep(0.1)
    daemon.wait_ready()


def test_fault_sigkill_during_the_restart_step(daemon: Deployd) -> None:
    deployment_id = daemon.deploy("slowstart")
    wait_for_phase(daemon, deployment_id, "restart")
    old = daemon.main_pid()

    daemon.kill("SIGKILL")
    wait_for_new_daemon(daemon, old)
    done = daemon.wait(deployment_id)

    assert done["status"] == "success", done["output"]
    output = done["output"]
    assert "built" in output
    assert "Restarting slowstart.service..." in output
    assert output.rstrip().endswith("==> Deployment succeeded")
    state = daemon.sandbox.systemctl("is-active", "slowstart.service", check=False)
    assert state.stdout.strip() == "active"


def test_fault_sigkill_during_the_health_check_does_not_restart_again(
    daemon: Deployd,
) -> None:
    daemon.sandbox.write("/run/checked-unhealthy", "")
    deployment_id = daemon.deploy("checked")
    wait_for_phase(daemon, deployment_id, "health")
    restarted = daemon.sandbox.systemctl("show", "-P", "MainPID", "checked.service")
    old = daemon.main_pid()

    daemon.kill("SIGKILL")
    wait_for_new_daemon(daemon, old)
    daemon.sandbox.run("rm", "/run/checked-unhealthy")
    done = daemon.wait(deployment_id, timeout=90)

    assert done["status"] == "success", done["output"]
    assert done["output"].count("Restarting checked.service...") == 1
    assert done["output"].rstrip().endswith("==> Deployment succeeded")
    now = daemon.sandbox.systemctl("show", "-P", "MainPID", "checked.service")
    assert now.stdout == restarted.stdout


def test_fault_bus_restarted_during_a_build(daemon: Deployd) -> None:
    deployment_id = daemon.deploy("ticks")
    time.sleep(0.5)
    old = daemon.main_pid()

    daemon.sandbox.systemctl("restart", "dbus.service")
    wait_for_new_daemon(daemon, old)
    done = daemon.wait(deployment_id)

    assert done["status"] == "success"
    ticks = [line for line in done["output"].splitlines() if line.startswith("tick")]
    assert ticks == [f"tick {n}" for n in range(1, 13)]
    assert "lost the connection to the system bus" in daemon.journal()


@pytest.mark.parametrize(
    ("target", "how", "marker"),
    [("forker", "cancel", "sleep 301"), ("forker_slow", "timeout", "sleep 302")],
)
def test_fault_daemonised_child_does_not_survive(
    daemon: Deployd, target: str, how: str, marker: str
) -> None:
    deployment_id = daemon.deploy(target)
    deadline = time.monotonic() + 10
    while "forked" not in daemon.get(f"/api/admin/deploy/{deployment_id}/log").text:
        assert time.monotonic() < deadline
        time.sleep(0.05)

    if how == "cancel":
        daemon.post(f"/api/admin/deploy/{deployment_id}/cancel")
    done = daemon.wait(deployment_id)

    assert done["status"] == ("cancelled" if how == "cancel" else "failed")
    leftover = daemon.sandbox.run("pgrep", "-f", marker, check=False)
    # pgrep exits 1 when it finds nothing, 2 or 3 when it could not look.
    assert (leftover.returncode, leftover.stdout) == (1, ""), leftover.stderr


def test_fault_state_directory_full(daemon: Deployd) -> None:
    sandbox = daemon.sandbox
    # A small filesystem over the state directory, the one place the hardened
    # unit may write; the history under it comes back when it is unmounted.
    daemon.stop()
    sandbox.run("mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", STATE)
    daemon.start()
    try:
        before = daemon.wait(daemon.deploy("ticks"))
        done = daemon.wait(daemon.deploy("flood"), timeout=120)

        listed = daemon.get("/api/admin/deploys")
        again = daemon.get(f"/api/admin/deploy/{before['id']}")
    finally:
        daemon.stop()
        sandbox.run("umount", STATE)
        daemon.start()

    assert done["status"] == "failed"
    assert f"(the state directory {STATE} is full)" in done["reason"]
    assert listed.status_code == 200
    assert [d["id"] for d in listed.json()["deploys"][:2]] == [done["id"], before["id"]]
    assert again.json()["status"] == "success"
    assert "tick 12" in again.json()["output"]
