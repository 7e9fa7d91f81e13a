"""The Debian package, installed with apt in a fresh sandbox.

The daemon here is the packaged one: /usr/bin/ares-deployd on Debian's own
python3-falcon, python3-waitress and python3-dbus-next, under the packaged unit.
The tests run in order, from installation to purge.
"""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ares_deployd import __version__
from tests.deployd import ROOT, SECRET, STATE, UNIT, Deployd, free_port
from tests.sandbox import Sandbox, can_boot

pytestmark = pytest.mark.integration

DEB = ROOT / "dist" / f"ares-deployd_{__version__}_all.deb"
WORK = "/srv/work"
DEMO_PORT = free_port()
APT_ENV = {"DEBIAN_FRONTEND": "noninteractive"}

TARGETS = f"""
[targets.demo]
working_directory = "{WORK}"
user = "nobody"
steps = [
    "echo building demo",
    "for i in 1 2 3 4 5 6 7 8; do echo tick $i; sleep 0.4; done",
]
restart = "demo.service"
health_url = "http://127.0.0.1:{DEMO_PORT}/health"

[targets.quick]
working_directory = "{WORK}"
user = "nobody"
steps = ["echo quick"]
"""

ADDED = f"""
[targets.added]
working_directory = "{WORK}"
user = "nobody"
steps = ["echo added by reload"]
"""

DEMO_UNIT = f"""\
[Service]
ExecStart=/usr/bin/python3 {ROOT}/examples/demo/server.py {DEMO_PORT} demo
"""

# Every path the package or the daemon makes; none may outlive a purge.
OWN_PATHS = [
    "/etc/ares-deployd",
    STATE,
    "/lib/systemd/system/ares-deployd.service",
    "/lib/systemd/system/ares-deployd.socket",
    "/etc/systemd/system/multi-user.target.wants/ares-deployd.service",
    "/usr/bin/ares-deployd",
    "/usr/bin/ares-deployctl",
    "/usr/lib/python3/dist-packages/ares_deployd",
    "/usr/share/doc/ares-deployd",
    "/usr/share/man/man8/ares-deployd.8.gz",
    "/usr/share/man/man1/ares-deployctl.1.gz",
]


@pytest.fixture(scope="module")
def deb() -> Path:
    subprocess.run(
        ["make", "deb"], cwd=ROOT, check=True, capture_output=True, timeout=300
    )
    assert DEB.exists(), sorted(p.name for p in DEB.parent.iterdir())
    return DEB


@pytest.fixture(scope="module")
def machine(deb: Path) -> Iterator[Sandbox]:
    """A fresh sandbox with the package installed by apt."""
    reason = can_boot()
    if reason is not None:
        pytest.fail(f"cannot boot a sandbox: {reason}")
    # The checkout (the package, the demo service) is shared: under /tmp, the
    # sandbox's own /tmp would hide it.
    with Sandbox.boot(share=[ROOT, deb.parent]) as sandbox:
        sandbox.run("install", "-d", "-m", "1777", WORK)
        sandbox.write("/etc/systemd/system/demo.service", DEMO_UNIT)
        sandbox.systemctl("daemon-reload")
        sandbox.systemctl("start", "demo.service")
        # A container image's policy-rc.d forbids starting services from
        # packages; a server has none, and the package is tested as on one.
        sandbox.run("rm", "-f", "/usr/sbin/policy-rc.d")
        sandbox.run("apt-get", "install", "-y", str(deb), env=APT_ENV, timeout=300)
        yield sandbox


@pytest.fixture(scope="module")
def daemon(machine: Sandbox) -> Deployd:
    """The packaged daemon, reached with the secret the package generated."""
    client = Deployd(machine, port=3001)
    client.secret = machine.run("cat", SECRET).stdout.strip()
    client.http.headers["X-Admin-Secret"] = client.secret
    return client


def show(daemon: Deployd, prop: str) -> str:
    return daemon.sandbox.systemctl("show", "-P", prop, UNIT).stdout.strip()


def test_package_install_leaves_the_service_active_and_answering(
    daemon: Deployd,
) -> None:
    sandbox = daemon.sandbox
    daemon.wait_ready()

    status = sandbox.systemctl("status", UNIT, "--no-pager", check=False).stdout
    mode = sandbox.run("stat", "-c", "%a %U", SECRET).stdout.split()
    anonymous = daemon.get("/api/admin/deploys", headers={"X-Admin-Secret": ""})

    assert show(daemon, "ActiveState") == "active"
    assert show(daemon, "UnitFileState") == "enabled"
    assert 'Status: "Idle; listening on 127.0.0.1:3001; no deployments yet"' in status
    assert re.fullmatch(r"[0-9a-f]{64}", daemon.secret)
    assert mode == ["600", "root"]
    assert daemon.get("/api/admin/deploys").json() == {"deploys": []}
    assert anonymous.status_code == 401
    assert sandbox.run("head", "-1", "/usr/bin/ares-deployd").stdout.strip() == (
        "#!/usr/bin/python3"
    )


def test_package_runs_on_debian_python_packages(daemon: Deployd) -> None:
    found = daemon.sandbox.run(
        "/usr/bin/python3",
        "-c",
        "import falcon, waitress, dbus_next, ares_deployd, importlib.metadata as m\n"
        "for module in (falcon, waitress, dbus_next, ares_deployd):\n"
        "    print(module.__file__)\n"
        "print(m.version('falcon'), m.version('waitress'), m.version('dbus-next'))",
    ).stdout.splitlines()

    packages = ("python3-falcon", "python3-waitress", "python3-dbus-next")
    listed = daemon.sandbox.run(
        "dpkg-query", "-W", "-f", "${Package} ${Version}\n", *packages
    ).stdout  # fmt: skip
    versions = dict(line.split() for line in listed.splitlines())

    assert all(line.startswith("/usr/lib/python3/dist-packages/") for line in found[:4])
    # Debian's versions, as on Debian 12: falcon 3.1, waitress 2.1, dbus-next 0.2.3.
    upstream = [versions[name].split(":")[-1].rsplit("-", 1)[0] for name in packages]
    assert found[4].split() == upstream


def test_package_ships_the_example_and_a_config_with_no_targets(
    daemon: Deployd,
) -> None:
    example = daemon.sandbox.run(
        "ares-deployd",
        "--check-config",
        "--config",
        "/usr/share/doc/ares-deployd/examples/config.toml",
        check=False,
    )
    shipped = daemon.post("/api/admin/deploy", json={"target": "ares"})

    assert example.stdout.strip() == "ok"
    assert (
        shipped.json()["message"] == "No target named 'ares' (known: none configured)"
    )


def test_package_deploys_builds_restarts_and_checks_health(daemon: Deployd) -> None:
    daemon.port = free_port()
    daemon.base_url = f"http://127.0.0.1:{daemon.port}"
    daemon.configure(TARGETS)
    daemon.restart()
    before = daemon.sandbox.systemctl("show", "-P", "MainPID", "demo.service").stdout

    done = daemon.wait(daemon.deploy("demo"))

    after = daemon.sandbox.systemctl("show", "-P", "MainPID", "demo.service").stdout
    assert done["status"] == "success", done["output"]
    assert "tick 8" in done["output"]
    assert f"Checking http://127.0.0.1:{DEMO_PORT}/health..." in done["output"]
    assert before != after
    status = daemon.sandbox.systemctl("status", UNIT, "--no-pager", check=False)
    assert 'Status: "Idle; last: demo success ' in status.stdout


def test_package_reload_takes_a_good_file_and_refuses_a_broken_one(
    daemon: Deployd,
) -> None:
    daemon.configure(TARGETS + ADDED)
    daemon.sandbox.systemctl("reload", UNIT)
    deadline = time.monotonic() + 20
    while daemon.post("/api/admin/deploy", json={"target": "added"}).status_code != 202:
        assert time.monotonic() < deadline, "the new target never became deployable"
        time.sleep(0.1)
    daemon.configure(TARGETS + ADDED + "[targets.bad]\nuser = 5\n")
    since = daemon.sandbox.run("date", "+%Y-%m-%d %H:%M:%S").stdout.strip()

    refused = daemon.sandbox.systemctl("reload", UNIT, check=False)
    errors = daemon.sandbox.run(
        "journalctl", "-u", UNIT, "-p", "err", "--since", since, "-o", "cat"
    ).stdout
    still = daemon.wait(daemon.deploy("added"))

    assert refused.returncode != 0
    assert "targets.bad.user: expected a string, got an integer 5" in errors
    assert "targets.bad.working_directory: missing" in errors
    assert still["status"] == "success"
    assert show(daemon, "ActiveState") == "active"
    daemon.configure(TARGETS)
    daemon.sandbox.systemctl("reload", UNIT)


def test_package_restart_mid_deployment_keeps_status_and_output(
    daemon: Deployd,
) -> None:
    deployment_id = daemon.deploy("demo")
    time.sleep(1)

    daemon.restart()
    done = daemon.wait(deployment_id)

    ticks = [line for line in done["output"].splitlines() if line.startswith("tick")]
    assert done["status"] == "success", done["output"]
    assert ticks == [f"tick {n}" for n in range(1, 9)]
    assert "Service started successfully." in done["output"]


def test_package_stop_finishes_the_request_in_flight(daemon: Deployd) -> None:
    body = b'{"target": "quick"}'
    sock = daemon.partial_post(body, 4)
    time.sleep(0.5)

    daemon.sandbox.systemctl("--no-block", "stop", UNIT)
    deadline = time.monotonic() + 20
    while show(daemon, "ActiveState") != "deactivating":
        assert time.monotonic() < deadline, show(daemon, "ActiveState")
        time.sleep(0.05)
    sock.sendall(body[4:])
    answer = http.client.HTTPResponse(sock)
    answer.begin()
    started = json.loads(answer.read())
    sock.close()
    while show(daemon, "ActiveState") != "inactive":
        assert time.monotonic() < deadline, show(daemon, "ActiveState")
        time.sleep(0.05)

    assert answer.status == 202
    assert show(daemon, "Result") == "success"
    daemon.start()
    assert daemon.wait(started["id"])["status"] == "success"


def test_package_reinstall_keeps_config_secret_history_and_deployment(
    daemon: Deployd, deb: Path
) -> None:
    sandbox = daemon.sandbox
    config = sandbox.run("cat", "/etc/ares-deployd/config.toml").stdout
    history = [d["id"] for d in daemon.get("/api/admin/deploys").json()["deploys"]]
    deployment_id = daemon.deploy("demo")
    time.sleep(1)

    sandbox.run(
        "apt-get", "install", "--reinstall", "-y", str(deb), env=APT_ENV, timeout=300
    )
    daemon.wait_ready()
    done = daemon.wait(deployment_id)

    after = [d["id"] for d in daemon.get("/api/admin/deploys").json()["deploys"]]
    assert sandbox.run("cat", "/etc/ares-deployd/config.toml").stdout == config
    assert sandbox.run("cat", SECRET).stdout.strip() == daemon.secret
    assert after[0] == deployment_id and set(history) <= set(after)
    assert done["status"] == "success", done["output"]
    assert "tick 8" in done["output"]


def test_package_security_exposure_is_at_most_one_and_a_half(daemon: Deployd) -> None:
    report = daemon.sandbox.run(
        "systemd-analyze", "security", "--no-pager", UNIT, check=False
    ).stdout

    score = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", report)
    assert score is not None, report
    assert float(score.group(1)) <= 1.5, report


def test_package_lintian_reports_no_errors_or_warnings(deb: Path) -> None:
    result = subprocess.run(
        ["lintian", "--fail-on", "error,warning", str(deb)],
        capture_output=True,
        text=True,
        timeout=300,
    )

    complaints = [
        line for line in result.stdout.splitlines() if line[:2] in ("E:", "W:")
    ]
    assert result.returncode == 0 and complaints == [], result.stdout + result.stderr


def test_package_remove_stops_it_and_purge_leaves_none_of_its_files(
    daemon: Deployd,
) -> None:
    sandbox = daemon.sandbox
    pid = show(daemon, "MainPID")

    sandbox.run("apt-get", "remove", "-y", "ares-deployd", env=APT_ENV, timeout=300)
    removed_state = show(daemon, "ActiveState")
    process_left = sandbox.path(f"/proc/{pid}").exists()
    secret_kept = sandbox.run("cat", SECRET).stdout.strip()
    sandbox.run("apt-get", "purge", "-y", "ares-deployd", env=APT_ENV, timeout=300)

    assert pid != "0"
    assert removed_state in ("inactive", "")
    assert not process_left
    assert secret_kept == daemon.secret

    left = sandbox.run(
        "sh", "-c", 'for p; do if [ -e "$p" ] || [ -L "$p" ]; then echo "$p"; fi; done',
        "left", *OWN_PATHS,
    ).stdout.split()  # fmt: skip
    state = sandbox.run(
        "dpkg-query", "-W", "-f=${db:Status-Status}", "ares-deployd", check=False
    )
    assert left == []
    assert state.stdout in ("", "not-installed")
    assert show(daemon, "LoadState") == "not-found"
    assert (
        sandbox.run("ls", "/var/lib/systemd/deb-systemd-helper-enabled").stdout.find(
            "ares-deployd"
        )
        == -1
    )
