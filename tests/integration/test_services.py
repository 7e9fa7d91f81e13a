"""Services against a real systemd: state, health, ports, journal lines, jobs."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
import requests

from tests.deployd import ROOT, UNIT, Deployd, free_port
from tests.integration.conftest import WORK

pytestmark = pytest.mark.integration

T = TypeVar("T")

WEB_PORT = free_port()
FIXED_PORT = free_port()
WORKER_PORT = free_port()
UNHEALTHY = "/run/svc-web-unhealthy"

WEB_UNIT = f"""\
[Service]
ExecStart=/usr/bin/python3 {ROOT}/examples/demo/server.py {WEB_PORT} svc-web
Environment=UNHEALTHY_FILE={UNHEALTHY}
"""

FIXED_UNIT = f"""\
[Service]
ExecStart=/usr/bin/python3 {ROOT}/examples/demo/server.py {FIXED_PORT} svc-fixed
"""

# A static frontend: a oneshot that stays active once its work is done. What it
# prints covers what the journal stores differently: colour, tabs, invalid
# UTF-8, a hyperlink, and one entry of several lines sent natively.
ADMIN_UNIT = """\
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/bin/svc-admin
"""

ADMIN_SCRIPT = r"""#!/bin/sh
printf 'plain line\n'
printf 'tab\there\n'
printf '\033[32mgreen\033[0m done\n'
printf 'bad utf8 \377\376 end\n'
printf 'unicode \342\234\223 ok\n'
printf 'osc \033]8;;http://x/\007link\033]8;;\007 done\n'
python3 -c '
import socket, struct
fields = [(b"MESSAGE", b"first\nsecond\tline\n\n  fourth"),
          (b"SYSLOG_IDENTIFIER", b"multi")]
data = b"".join(k + b"\n" + struct.pack("<Q", len(v)) + v + b"\n" for k, v in fields)
socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(
    data, "/run/systemd/journal/socket")
'
printf 'last line\n'
"""

# Its server runs in a group it made below its unit's, and listens on IPv6 only.
WORKER_UNIT = f"""\
[Service]
Delegate=yes
ExecStart=/bin/sh -c 'group=/sys/fs/cgroup$$(sed -n "s/^0:://p" /proc/self/cgroup); \\
    mkdir "$$group/server" && echo $$$$ > "$$group/server/cgroup.procs" && \\
    exec /usr/bin/python3 -m http.server --bind ::1 {WORKER_PORT}'
"""

CRASHY_UNIT = """\
[Service]
Type=oneshot
ExecStart=/bin/sh -c 'echo giving up; exit 3'
"""

SERVICES = f"""
[services.web]
unit = "svc-web.service"
health_url = "http://127.0.0.1:{WEB_PORT}/health"

[services.fixed]
unit = "svc-fixed.service"
port = {FIXED_PORT}

[services.admin]
unit = "svc-admin.service"

[services.crashy]
unit = "svc-crashy.service"

[services.ghost]
unit = "svc-ghost.service"

[services.late]
unit = "svc-late.service"

[targets.webdeploy]
working_directory = "{WORK}"
user = "root"
steps = ["sleep 30"]
restart = "svc-web.service"
"""


def wait_for(read: Callable[[], T], ok: Callable[[T], bool], timeout: float = 20) -> T:
    """``read()`` once ``ok`` holds for it; fails the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if ok(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"still not as expected after {timeout}s: {value}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def daemon(deployd: Deployd) -> Deployd:
    sandbox = deployd.sandbox
    for name, text in (
        ("svc-web", WEB_UNIT),
        ("svc-fixed", FIXED_UNIT),
        ("svc-admin", ADMIN_UNIT),
        ("svc-crashy", CRASHY_UNIT),
    ):
        sandbox.write(f"/etc/systemd/system/{name}.service", text)
    sandbox.write("/usr/local/bin/svc-admin", ADMIN_SCRIPT, mode=0o755)
    sandbox.systemctl("daemon-reload")
    sandbox.systemctl("start", "svc-web", "svc-fixed", "svc-admin")
    sandbox.systemctl("start", "svc-crashy", check=False)
    deployd.configure(SERVICES, server='health_interval = "1s"')
    deployd.restart()
    return deployd


def services(daemon: Deployd) -> dict[str, Any]:
    answer = daemon.get("/api/admin/services")
    assert answer.status_code == 200, answer.text
    return answer.json()


def service(daemon: Deployd, name: str) -> dict[str, Any]:
    answer = daemon.get(f"/api/admin/services/{name}")
    assert answer.status_code == 200, answer.text
    return answer.json()


def main_pid(daemon: Deployd, unit: str) -> int:
    return int(daemon.sandbox.systemctl("show", "-P", "MainPID", unit).stdout)


def journalctl(daemon: Deployd, *args: str) -> list[str]:
    """What journalctl itself prints, line by line."""
    result = daemon.sandbox.run(
        "journalctl", "--no-pager", "-o", "short", *args, check=False
    )
    return result.stdout.splitlines()


def test_services_list_shows_every_configured_service(daemon: Deployd) -> None:
    listed = wait_for(
        lambda: services(daemon), lambda body: body["web"]["port"] is not None
    )

    assert list(listed) == ["web", "fixed", "admin", "crashy", "ghost", "late"]
    assert listed["web"]["status"] in ("running", "degraded")
    assert listed["web"]["pid"] == main_pid(daemon, "svc-web.service")
    assert listed["fixed"] == {
        **listed["fixed"],
        "status": "running",
        "pid": main_pid(daemon, "svc-fixed.service"),
        "port": FIXED_PORT,
        "health": None,
    }
    assert listed["admin"]["status"] == "running"
    assert listed["admin"]["sub_state"] == "exited"
    assert (listed["admin"]["pid"], listed["admin"]["port"]) == (None, None)
    assert listed["crashy"]["status"] == "stopped"
    assert listed["crashy"]["active_state"] == "failed"
    assert listed["ghost"]["status"] == "stopped"
    assert listed["ghost"]["load_state"] == "not-found"


def test_service_port_is_found_from_its_listening_socket(daemon: Deployd) -> None:
    web = wait_for(lambda: service(daemon, "web"), lambda body: body["listening"])

    assert web["port"] == WEB_PORT
    assert web["listening"] == [WEB_PORT]


def test_service_port_is_found_below_its_unit_and_over_ipv6(daemon: Deployd) -> None:
    sandbox = daemon.sandbox
    sandbox.write("/etc/systemd/system/svc-worker.service", WORKER_UNIT)
    sandbox.systemctl("daemon-reload")
    sandbox.systemctl("start", "svc-worker.service")
    worker = '\n[services.worker]\nunit = "svc-worker.service"\n'
    daemon.configure(SERVICES + worker, server='health_interval = "1s"')
    sandbox.systemctl("reload", UNIT)
    try:
        found = wait_for(
            lambda: services(daemon),
            lambda body: "worker" in body and body["worker"]["port"] is not None,
        )
    finally:
        daemon.configure(SERVICES, server='health_interval = "1s"')
        sandbox.systemctl("reload", UNIT)
        sandbox.systemctl("stop", "svc-worker.service", check=False)
        sandbox.run("rm", "-f", "/etc/systemd/system/svc-worker.service")
        sandbox.systemctl("daemon-reload")

    assert found["worker"]["port"] == WORKER_PORT
    assert found["web"]["port"] == WEB_PORT


def test_service_follows_stop_start_failure_and_restart(daemon: Deployd) -> None:
    sandbox = daemon.sandbox

    sandbox.systemctl("stop", "svc-fixed.service")
    stopped = wait_for(
        lambda: service(daemon, "fixed"), lambda body: body["status"] == "stopped"
    )
    sandbox.systemctl("start", "svc-fixed.service")
    started = wait_for(
        lambda: service(daemon, "fixed"), lambda body: body["status"] == "running"
    )
    pid_started = main_pid(daemon, "svc-fixed.service")
    sandbox.systemctl("kill", "--signal=SIGKILL", "svc-fixed.service")
    failed = wait_for(
        lambda: service(daemon, "fixed"), lambda body: body["active_state"] == "failed"
    )
    restarted = daemon.post("/api/admin/services/fixed/restart")

    assert (stopped["pid"], stopped["active_state"]) == (None, "inactive")
    assert started["pid"] == pid_started
    assert (failed["status"], failed["pid"], failed["result"]) == (
        "stopped",
        None,
        "signal",
    )
    assert restarted.status_code == 200, restarted.text
    body = restarted.json()
    assert (body["action"], body["job"], body["status"]) == (
        "restart",
        "done",
        "running",
    )
    assert body["pid"] == main_pid(daemon, "svc-fixed.service")
    assert body["pid"] != started["pid"]


def test_service_restart_gives_a_new_pid(daemon: Deployd) -> None:
    before = service(daemon, "web")["pid"]

    answer = daemon.post("/api/admin/services/web/restart")

    assert answer.status_code == 200, answer.text
    assert answer.json()["pid"] not in (None, before)
    assert answer.json()["pid"] == main_pid(daemon, "svc-web.service")
    assert services(daemon)["web"]["pid"] == answer.json()["pid"]


def test_service_stop_and_start_through_the_api(daemon: Deployd) -> None:
    stopped = daemon.post("/api/admin/services/fixed/stop")
    started = daemon.post("/api/admin/services/fixed/start")

    assert stopped.status_code == 200 and started.status_code == 200
    assert (stopped.json()["status"], stopped.json()["pid"]) == ("stopped", None)
    assert started.json()["status"] == "running"
    assert started.json()["pid"] == main_pid(daemon, "svc-fixed.service")


def test_service_failing_health_check_is_degraded_until_it_passes(
    daemon: Deployd,
) -> None:
    daemon.sandbox.write(UNHEALTHY, "")
    try:
        sick = wait_for(
            lambda: service(daemon, "web"), lambda body: body["status"] == "degraded"
        )
    finally:
        daemon.sandbox.run("rm", "-f", UNHEALTHY)
    well = wait_for(
        lambda: service(daemon, "web"), lambda body: body["status"] == "running"
    )

    assert sick["health"] == "failing"
    assert sick["health_detail"] == "answered 503"
    assert sick["active_state"] == "active"
    assert well["health"] == "passing"


def test_service_restart_of_failing_unit_answers_job_result(daemon: Deployd) -> None:
    answer = daemon.post("/api/admin/services/crashy/restart")

    assert answer.status_code == 502
    body = answer.json()
    assert body["error"] == "job_failed"
    assert (body["result"], body["reason"]) == ("failed", "exit-code")
    assert body["service"]["status"] == "stopped"
    assert "svc-crashy.service failed (exit-code)" in body["message"]


def test_service_start_of_missing_unit_is_refused(daemon: Deployd) -> None:
    answer = daemon.post("/api/admin/services/ghost/start")

    assert answer.status_code == 502
    assert answer.json()["error"] == "systemd_error"
    assert "svc-ghost.service" in answer.json()["message"]


def test_service_restart_while_its_deployment_runs_is_409(daemon: Deployd) -> None:
    deployment_id = daemon.deploy("webdeploy")
    try:
        answer = daemon.post("/api/admin/services/web/restart")
        other = daemon.post("/api/admin/services/fixed/restart")
    finally:
        daemon.post(f"/api/admin/deploy/{deployment_id}/cancel")
        daemon.wait(deployment_id)

    assert answer.status_code == 409
    assert answer.json()["error"] == "service_busy"
    assert answer.json()["id"] == deployment_id
    assert other.status_code == 200


def hit(port: int, path: str) -> None:
    """GET a demo server's page, once it listens: it logs one line a request."""
    deadline = time.monotonic() + 20
    while True:
        try:
            requests.get(f"http://127.0.0.1:{port}{path}", timeout=5)
            return
        except requests.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def logs(daemon: Deployd, name: str, **params: Any) -> dict[str, Any]:
    answer = daemon.get(f"/api/admin/services/{name}/logs", params=params)
    assert answer.status_code == 200, answer.text
    return answer.json()


def assert_same_as_journalctl(lines: list[str], expected: list[str]) -> None:
    """Line for line, but where journalctl prints a blob the text shows."""
    ours = "\n".join(lines).split("\n") if lines else []
    assert len(ours) == len(expected)
    for mine, theirs in zip(ours, expected, strict=True):
        if theirs.endswith(" blob data]"):
            assert mine == theirs.rpartition(": ")[0] + ": bad utf8 \ufffd\ufffd end"
        else:
            assert mine == theirs


def test_logs_equal_journalctl_short_line_for_line(daemon: Deployd) -> None:
    expected = journalctl(daemon, "-u", "svc-admin.service", "-n", "30")

    body = logs(daemon, "admin", lines=30)

    assert body["service"] == "admin"
    assert len(expected) > 10
    assert_same_as_journalctl(body["lines"], expected)
    ours = "\n".join(body["lines"]).split("\n")
    assert any(line.endswith(": green done") for line in ours)
    assert any(line.endswith(": tab        here") for line in ours)
    assert any(line.endswith(": osc link done") for line in ours)
    assert any(line.endswith(": unicode \u2713 ok") for line in ours)


def test_logs_lines_takes_the_newest(daemon: Deployd) -> None:
    expected = journalctl(daemon, "-u", "svc-admin.service", "-n", "2")

    body = logs(daemon, "admin", lines=2)

    assert body["lines"] == expected
    assert body["lines"][-1].endswith(": Finished svc-admin.service.")


def test_logs_default_is_a_hundred_lines(daemon: Deployd) -> None:
    for n in range(110):
        hit(FIXED_PORT, f"/count-{n}")
    wait_for(
        lambda: journalctl(daemon, "-u", "svc-fixed.service", "-n", "1"),
        lambda last: last and "/count-109 " in last[0],
    )

    body = logs(daemon, "fixed")

    assert len(body["lines"]) == 100
    assert body["lines"] == journalctl(daemon, "-u", "svc-fixed.service", "-n", "100")


def test_logs_after_cursor_continues_without_loss_or_repeat(daemon: Deployd) -> None:
    first = logs(daemon, "fixed", lines=1)
    start = first["cursor"]
    for n in range(7):
        hit(FIXED_PORT, f"/probe-{n}")
    wait_for(
        lambda: journalctl(daemon, "-u", "svc-fixed.service", "-n", "1"),
        lambda last: last and "/probe-6 " in last[0],
    )

    seen: list[str] = []
    cursor = start
    for _ in range(20):
        page = logs(daemon, "fixed", lines=3, after=cursor)
        seen += page["lines"]
        if not page["lines"]:
            assert page["cursor"] == cursor
            break
        cursor = page["cursor"]

    probes = [line for line in seen if "/probe-" in line]
    assert [line.split("GET ")[1] for line in probes] == [
        f"/probe-{n} 200" for n in range(7)
    ]
    assert seen == journalctl(
        daemon, "-u", "svc-fixed.service", f"--after-cursor={start}"
    )


def test_logs_since_starts_at_that_time(daemon: Deployd) -> None:
    expected = journalctl(daemon, "-u", "svc-admin.service", "-n", "1", "-o", "json")
    stamp = int(__import__("json").loads(expected[0])["__REALTIME_TIMESTAMP"])
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(stamp // 1_000_000))

    body = logs(daemon, "admin", since=since + "Z", lines=50)

    assert_same_as_journalctl(
        body["lines"],
        journalctl(daemon, "-u", "svc-admin.service", f"--since=@{stamp // 1_000_000}"),
    )
    assert body["lines"][-1].endswith(": Finished svc-admin.service.")


def test_logs_of_unit_without_entries_are_empty(daemon: Deployd) -> None:
    body = logs(daemon, "ghost")

    assert body == {
        "service": "ghost",
        "unit": "svc-ghost.service",
        "lines": [],
        "cursor": None,
    }


def test_logs_leave_no_journalctl_behind(daemon: Deployd) -> None:
    for _ in range(5):
        logs(daemon, "admin", lines=5)

    # Host pids: one process left, the daemon itself.
    assert len(daemon.processes_of(UNIT)) == 1


@pytest.mark.parametrize(
    "name",
    [
        "nope",
        "..%2f..%2fetc",
        "..",
        "%00",
        "web%00",
        "x" * 4000,
        "%C3%BCn%C3%AFc%C3%B6d%C3%A9",
        "WEB",
    ],
)
@pytest.mark.parametrize("suffix", ["", "/logs"])
def test_service_unknown_name_is_404(daemon: Deployd, name: str, suffix: str) -> None:
    answer = daemon.get(f"/api/admin/services/{name}{suffix}")

    assert answer.status_code == 404
    assert answer.json()["error"] == "not_found"


@pytest.mark.parametrize("verb", ["start", "stop", "restart"])
def test_service_unknown_name_cannot_be_touched(daemon: Deployd, verb: str) -> None:
    answer = daemon.post(f"/api/admin/services/..%2fghost/{verb}")
    plain = daemon.post(f"/api/admin/services/nope/{verb}")

    assert answer.status_code == 404
    assert plain.status_code == 404
    assert plain.json()["message"].startswith("No service named 'nope' (known: web")


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"lines": 0}, "bad_lines"),
        ({"lines": 10001}, "bad_lines"),
        ({"lines": "ten"}, "bad_lines"),
        ({"lines": "-1"}, "bad_lines"),
        ({"lines": "1.5"}, "bad_lines"),
        ({"lines": "\u0661"}, "bad_lines"),
        ({"since": "yesterday"}, "bad_since"),
        ({"since": "2026-03-13"}, "bad_since"),
        ({"after": "not-a-cursor"}, "bad_after"),
        ({"after": "s=1", "since": "2026-03-13T00:00:00Z"}, "since_and_after"),
    ],
)
def test_logs_bad_parameters_are_400(daemon: Deployd, params, code: str) -> None:
    answer = daemon.get("/api/admin/services/admin/logs", params=params)

    assert answer.status_code == 400
    assert answer.json()["error"] == code


def test_service_unit_created_later_is_seen_after_daemon_reload(
    daemon: Deployd,
) -> None:
    sandbox = daemon.sandbox
    before = service(daemon, "late")
    sandbox.write("/etc/systemd/system/svc-late.service", ADMIN_UNIT)
    sandbox.systemctl("daemon-reload")
    try:
        loaded = wait_for(
            lambda: service(daemon, "late"),
            lambda body: body["load_state"] == "loaded",
        )
        started = daemon.post("/api/admin/services/late/start")
    finally:
        sandbox.systemctl("stop", "svc-late.service", check=False)
        sandbox.run("rm", "-f", "/etc/systemd/system/svc-late.service")
        sandbox.systemctl("daemon-reload")
    gone = wait_for(
        lambda: service(daemon, "late"),
        lambda body: body["load_state"] == "not-found",
    )

    assert (before["load_state"], before["status"]) == ("not-found", "stopped")
    assert (loaded["status"], loaded["active_state"]) == ("stopped", "inactive")
    assert started.status_code == 200, started.text
    assert started.json()["status"] == "running"
    assert gone["status"] == "stopped"


def test_service_configuration_reload_follows_the_new_services(
    daemon: Deployd,
) -> None:
    extra = '\n[services.extra]\nunit = "svc-fixed.service"\n'
    daemon.configure(SERVICES + extra, server='health_interval = "1s"')
    daemon.sandbox.systemctl("reload", UNIT)
    try:
        added = wait_for(
            lambda: services(daemon),
            lambda body: "extra" in body and body["extra"]["port"] is not None,
        )
    finally:
        daemon.configure(SERVICES, server='health_interval = "1s"')
        daemon.sandbox.systemctl("reload", UNIT)
    removed = wait_for(lambda: services(daemon), lambda body: "extra" not in body)

    assert added["extra"]["status"] == "running"
    assert added["extra"]["pid"] == added["fixed"]["pid"]
    assert added["extra"]["port"] == FIXED_PORT
    assert list(removed) == ["web", "fixed", "admin", "crashy", "ghost", "late"]
