"""``ares-deployctl`` run as a program against the real daemon in the sandbox."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.deployd import ROOT, Deployd, free_port
from tests.integration.conftest import WORK

pytestmark = pytest.mark.integration

WEB_PORT = free_port()
REVISION_FILE = f"{WORK}/ctl-revision"
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

TARGETS = f"""
[targets.ok]
working_directory = "{WORK}"
user = "nobody"
steps = ["echo hello from ok", "echo second step"]

[targets.broken]
working_directory = "{WORK}"
user = "nobody"
steps = ["echo before", "echo dying; exit 7"]

[targets.endless]
working_directory = "{WORK}"
user = "root"
steps = ["echo running; sleep 300"]

[targets.ticking]
working_directory = "{WORK}"
user = "root"
steps = ["for i in $(seq 1 16); do echo tick $i; sleep 0.5; done"]

[targets.versioned]
working_directory = "{WORK}"
user = "root"
revision = "cat {REVISION_FILE}"
steps = ['echo "deploying $DEPLOY_REF"; printf %s "$DEPLOY_REF" > {REVISION_FILE}']

[services.web]
unit = "ctl-web.service"
"""

WEB_UNIT = f"""\
[Service]
ExecStart=/usr/bin/python3 {ROOT}/examples/demo/server.py {WEB_PORT} ctl-web
"""


@pytest.fixture(scope="module")
def daemon(deployd: Deployd) -> Deployd:
    sandbox = deployd.sandbox
    sandbox.write("/etc/systemd/system/ctl-web.service", WEB_UNIT)
    sandbox.write(REVISION_FILE, "v0")
    sandbox.systemctl("daemon-reload")
    sandbox.systemctl("start", "ctl-web.service")
    deployd.configure(TARGETS)
    deployd.restart()
    return deployd


def environment(secret: str | None) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("ARES_DEPLOYD_URL", "ARES_ADMIN_SECRET", "NO_COLOR")
    }
    if secret is not None:
        env["ARES_ADMIN_SECRET"] = secret
    return env


def command(daemon: Deployd, *args: str) -> list[str]:
    return [sys.executable, "-m", "ares_deployd.ctl", "--url", daemon.base_url, *args]


def ctl(
    daemon: Deployd, *args: str, secret: str | None = None, timeout: float = 90
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command(daemon, *args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environment(secret or daemon.secret),
        cwd=ROOT,
    )


class Running:
    """The client running in the background, its output read line by line."""

    def __init__(self, daemon: Deployd, *args: str) -> None:
        self.process = subprocess.Popen(
            command(daemon, *args),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=environment(daemon.secret),
            cwd=ROOT,
        )
        self.lines: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def wait_for(self, wanted: Callable[[str], bool], timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                self.process.kill()
                raise AssertionError(f"no such line; got {self.lines}")
            self.lines.append(line)
            if wanted(line):
                return line

    def interrupt(self, timeout: float = 20) -> tuple[int, str]:
        self.process.send_signal(signal.SIGINT)
        code = self.process.wait(timeout)
        assert self.process.stderr is not None
        return code, self.process.stderr.read()

    def finish(self, timeout: float = 90) -> tuple[int, list[str], str]:
        code = self.process.wait(timeout)
        while (line := self._lines.get(timeout=10)) is not None:
            self.lines.append(line)
        assert self.process.stderr is not None
        return code, self.lines, self.process.stderr.read()


@pytest.fixture
def running() -> Iterator[Callable[..., Running]]:
    started: list[Running] = []

    def start(daemon: Deployd, *args: str) -> Running:
        started.append(Running(daemon, *args))
        return started[-1]

    yield start
    for one in started:
        if one.process.poll() is None:
            one.process.kill()
            one.process.wait()


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("Error: ")]


# Without following.


def test_ctl_wrong_secret_exits_3_with_one_error_line(daemon: Deployd) -> None:
    result = ctl(daemon, "list", secret="not-the-secret")

    assert result.returncode == 3
    assert result.stdout == ""
    assert result.stderr == ("Error: A valid X-Admin-Secret header is required\n")


def test_ctl_unreachable_daemon_exits_3_naming_the_url(daemon: Deployd) -> None:
    url = f"http://127.0.0.1:{free_port()}"

    result = ctl(daemon, "--url", url, "services")

    assert result.returncode == 3
    assert result.stderr == f"Error: cannot connect to {url}: Connection refused\n"


def test_ctl_deploy_no_wait_prints_the_id(daemon: Deployd) -> None:
    result = ctl(daemon, "deploy", "ok", "--no-wait")

    assert result.returncode == 0, result.stderr
    assert UUID.fullmatch(result.stdout.strip())
    assert daemon.wait(result.stdout.strip())["status"] == "success"


def test_ctl_deploy_unknown_target_is_the_api_message(daemon: Deployd) -> None:
    result = ctl(daemon, "deploy", "nope")

    assert result.returncode == 3
    assert errors(result.stderr) == result.stderr.splitlines()
    assert result.stderr.startswith("Error: No target named 'nope' (known: ")
    assert "ok" in result.stderr


def test_ctl_list_shows_revisions_and_filters(daemon: Deployd) -> None:
    ids = [daemon.wait(daemon.deploy("ok"))["id"] for _ in range(2)]
    failed = daemon.wait(daemon.deploy("broken"))["id"]

    table = ctl(daemon, "list", "--target", "ok", "--limit", "2")
    as_json = ctl(daemon, "--json", "list", "--status", "failed")

    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split() == [
        "ID",
        "TARGET",
        "STATUS",
        "STARTED",
        "FINISHED",
        "BEFORE",
        "REVISION",
        "REASON",
    ]
    assert [row.split()[0] for row in rows] == ids[::-1]
    assert all(row.split()[1:3] == ["ok", "success"] for row in rows)
    assert all(row.split()[5:] == ["-", "-", "-"] for row in rows)
    answer = json.loads(as_json.stdout)
    assert (
        answer == daemon.get("/api/admin/deploys", params={"status": "failed"}).json()
    )
    assert answer["deploys"][0]["id"] == failed


def test_ctl_status_shows_the_deployment(daemon: Deployd) -> None:
    done = daemon.wait(daemon.deploy("broken"))

    table = ctl(daemon, "status", done["id"])
    as_json = ctl(daemon, "status", done["id"], "--json")

    assert table.returncode == 0, table.stderr
    fields = dict(line.split(None, 1) for line in table.stdout.splitlines())
    assert fields["id"] == done["id"]
    assert fields["status"] == "failed"
    assert fields["reason"] == "step 2 `echo dying; exit 7` exited with status 7"
    assert fields["revision_before"] == "-" and fields["revision"] == "-"
    assert fields["finished_at"] == done["finished_at"]
    assert json.loads(as_json.stdout) == done


def test_ctl_status_unknown_id_exits_3(daemon: Deployd) -> None:
    result = ctl(daemon, "status", "00000000-0000-0000-0000-000000000000")

    assert result.returncode == 3
    assert result.stderr == (
        "Error: No deployment with id '00000000-0000-0000-0000-000000000000'\n"
    )


def test_ctl_output_prints_the_whole_log(daemon: Deployd) -> None:
    done = daemon.wait(daemon.deploy("ok"))

    result = ctl(daemon, "output", done["id"])
    as_json = ctl(daemon, "--json", "output", done["id"])

    log = daemon.get(f"/api/admin/deploy/{done['id']}/log").text
    assert result.returncode == 0, result.stderr
    assert result.stdout == log
    assert "hello from ok" in log
    assert json.loads(as_json.stdout) == log


def test_ctl_cancel_ends_the_deployment(daemon: Deployd) -> None:
    deployment_id = daemon.deploy("endless")
    time.sleep(0.5)

    result = ctl(daemon, "cancel", deployment_id)
    again = ctl(daemon, "cancel", deployment_id)

    assert result.returncode == 0, result.stderr
    assert result.stdout == f"Deployment {deployment_id} of endless: cancelled\n"
    assert daemon.wait(deployment_id)["status"] == "cancelled"
    assert again.returncode == 3
    assert again.stderr == (
        f"Error: Deployment {deployment_id} has ended already (cancelled)\n"
    )


def test_ctl_services_shows_each_service(daemon: Deployd) -> None:
    table = ctl(daemon, "services")
    as_json = ctl(daemon, "services", "--json")

    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()
    assert header.split() == [
        "NAME",
        "STATUS",
        "PID",
        "PORT",
        "HEALTH",
        "UNIT",
        "SINCE",
    ]
    main_pid = daemon.sandbox.systemctl("show", "-P", "MainPID", "ctl-web").stdout
    assert row.split()[:6] == [
        "web",
        "running",
        main_pid.strip(),
        str(WEB_PORT),
        "-",
        "ctl-web.service",
    ]
    assert json.loads(as_json.stdout)["web"]["unit"] == "ctl-web.service"


def test_ctl_restart_and_logs_show_the_new_process(daemon: Deployd) -> None:
    show = ("show", "-P", "MainPID", "ctl-web")
    before = daemon.sandbox.systemctl(*show).stdout.strip()

    restarted = ctl(daemon, "restart", "web")
    logs = ctl(daemon, "logs", "web", "-n", "3")
    as_json = ctl(daemon, "logs", "web", "--json")

    after = daemon.sandbox.systemctl(*show).stdout.strip()
    assert restarted.returncode == 0, restarted.stderr
    assert after != before
    assert restarted.stdout == (
        f"Restarted web (ctl-web.service): running, pid {after}\n"
    )
    assert logs.returncode == 0, logs.stderr
    lines = logs.stdout.splitlines()
    assert len(lines) == 3
    assert f"ctl-web listening on 127.0.0.1:{WEB_PORT}" in lines[-1]
    assert json.loads(as_json.stdout)["lines"][-3:] == lines


def test_ctl_logs_unknown_service_exits_3(daemon: Deployd) -> None:
    result = ctl(daemon, "logs", "nope")

    assert result.returncode == 3
    assert result.stderr == "Error: No service named 'nope' (known: web)\n"


def test_ctl_reads_the_daemon_configuration(daemon: Deployd, tmp_path: Path) -> None:
    (tmp_path / "secret").write_text(daemon.secret + "\n")
    (tmp_path / "config.toml").write_text(
        f'[server]\nlisten = "0.0.0.0:{daemon.port}"\n'
        f'admin_secret_file = "{tmp_path / "secret"}"\n'
    )

    result = subprocess.run(
        [sys.executable, "-m", "ares_deployd.ctl", "services", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            **environment(None),
            "ARES_DEPLOYD_CONFIG": str(tmp_path / "config.toml"),
        },
        cwd=ROOT,
    )

    assert result.returncode == 0, result.stderr
    assert "web" in json.loads(result.stdout)


# Following.


def test_ctl_deploy_success_exits_0_with_the_output(daemon: Deployd) -> None:
    result = ctl(daemon, "deploy", "ok")

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "hello from ok" in lines and "second step" in lines
    assert lines[-1] == "==> Deployment succeeded"
    assert lines.index("hello from ok") < lines.index("second step")
    assert errors(result.stderr) == []


def test_ctl_deploy_failure_exits_1_with_the_output(daemon: Deployd) -> None:
    result = ctl(daemon, "deploy", "broken")

    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert "dying" in lines
    assert lines[-1] == (
        "==> Deployment failed: step 2 `echo dying; exit 7` exited with status 7"
    )
    assert errors(result.stderr) == []


def test_ctl_deploy_json_prints_the_final_deployment(daemon: Deployd) -> None:
    result = ctl(daemon, "--json", "deploy", "broken")

    assert result.returncode == 1, result.stderr
    final = json.loads(result.stdout)
    assert final["status"] == "failed"
    assert final["target"] == "broken"
    assert "output" not in final
    assert final == {
        key: value for key, value in daemon.wait(final["id"]).items() if key != "output"
    }


def test_ctl_output_follow_replays_a_finished_deployment(daemon: Deployd) -> None:
    done = daemon.wait(daemon.deploy("broken"))

    result = ctl(daemon, "output", done["id"], "-f")

    assert result.returncode == 1, result.stderr
    assert result.stdout == daemon.get(f"/api/admin/deploy/{done['id']}/log").text


def test_ctl_deploy_follow_resumes_across_a_daemon_restart(
    daemon: Deployd, running
) -> None:
    client = running(daemon, "deploy", "ticking")
    client.wait_for(lambda line: line == "tick 3")

    daemon.restart()
    code, lines, stderr = client.finish()

    assert code == 0, stderr
    ticks = [line for line in lines if line.startswith("tick ")]
    assert ticks == [f"tick {n}" for n in range(1, 17)]
    assert lines[-1] == "==> Deployment succeeded"


def test_ctl_interrupt_stops_following_not_the_deployment(
    daemon: Deployd, running
) -> None:
    client = running(daemon, "deploy", "endless")
    client.wait_for(lambda line: line == "running")

    code, stderr = client.interrupt()

    deployment_id = daemon.get(
        "/api/admin/deploys", params={"target": "endless", "limit": 1}
    ).json()["deploys"][0]["id"]
    assert code == 130
    assert f"ares-deployctl cancel {deployment_id}" in stderr
    assert "Traceback" not in stderr
    assert daemon.get(f"/api/admin/deploy/{deployment_id}").json()["status"] == (
        "running"
    )
    daemon.post(f"/api/admin/deploy/{deployment_id}/cancel")
    daemon.wait(deployment_id)


def test_ctl_logs_follow_prints_new_lines(daemon: Deployd, running) -> None:
    client = running(daemon, "logs", "web", "-f", "-n", "1")
    first = client.wait_for(lambda line: "ctl-web listening" in line)

    daemon.post("/api/admin/services/web/restart")
    second = client.wait_for(lambda line: "ctl-web listening" in line)
    code, stderr = client.interrupt()

    assert first != second
    assert code == 130
    assert errors(stderr) == [] and "Traceback" not in stderr


def test_ctl_rollback_deploys_the_revision_before(daemon: Deployd) -> None:
    first = ctl(daemon, "deploy", "versioned", "--ref", "v1")
    second = ctl(daemon, "deploy", "versioned", "--ref", "v2")

    rollback = ctl(daemon, "--json", "rollback", "versioned")

    assert (first.returncode, second.returncode) == (0, 0), second.stderr
    assert rollback.returncode == 0, rollback.stderr
    final = json.loads(rollback.stdout)
    newest = daemon.get(
        "/api/admin/deploys", params={"target": "versioned", "limit": 2}
    ).json()["deploys"]
    assert newest[0]["id"] == final["id"]
    assert final["rollback_of"] == newest[1]["id"]
    assert (final["revision_before"], final["revision"]) == ("v2", "v1")
