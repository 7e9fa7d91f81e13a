"""ares-deployd installed as a real systemd service inside a sandbox.

The unit comes from ``units/``; a drop-in points it at this checkout's virtual
environment. Tests and ``make run`` both use it.
"""

from __future__ import annotations

import secrets
import socket
import sys
import time
from pathlib import Path
from typing import Any

import requests

from tests.sandbox import Sandbox

ROOT = Path(__file__).resolve().parents[1]
UNIT = "ares-deployd.service"
CONFIG = "/etc/ares-deployd/config.toml"
SECRET = "/etc/ares-deployd/admin-secret"
STATE = "/var/lib/ares-deployd"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Deployd:
    """One daemon in one sandbox, reached over loopback."""

    def __init__(self, sandbox: Sandbox, port: int | None = None) -> None:
        self.sandbox = sandbox
        self.port = port or free_port()
        self.secret = secrets.token_urlsafe(24)
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.http = requests.Session()
        self.http.headers["X-Admin-Secret"] = self.secret

    def install(self, executable: str | None = None, log_level: str = "debug") -> None:
        """Put the unit, a drop-in for this checkout, and the secret in place."""
        program = executable or str(Path(sys.prefix) / "bin" / "ares-deployd")
        self.sandbox.write(
            f"/etc/systemd/system/{UNIT}", (ROOT / "units" / UNIT).read_text()
        )
        # The checkout may lie under /tmp or a home directory, which the unit
        # hides from the daemon: bind it (and its environment) back, read-only.
        shared = " ".join(sorted({str(ROOT), str(Path(sys.prefix).resolve())}))
        self.sandbox.write(
            f"/etc/systemd/system/{UNIT}.d/checkout.conf",
            f"[Service]\nExecStart=\nExecStart={program} --log-level {log_level}\n"
            f"ExecReload=\nExecReload={program} --check-config\n"
            "ExecReload=/bin/kill -HUP $MAINPID\n"
            f"ProtectHome=tmpfs\nBindReadOnlyPaths={shared}\n",
        )
        self.sandbox.write(SECRET, self.secret + "\n", mode=0o600)
        self.sandbox.systemctl("daemon-reload")

    def configure(self, body: str, server: str = "") -> None:
        """Write a configuration: ``[server]`` with our port, then ``body``."""
        self.sandbox.write(
            CONFIG,
            f'[server]\nlisten = "127.0.0.1:{self.port}"\n'
            f'admin_secret_file = "{SECRET}"\n{server}\n{body}',
        )

    def start(self, timeout: float = 20) -> None:
        self.sandbox.systemctl("start", UNIT)
        self.wait_ready(timeout)

    def restart(self, timeout: float = 20) -> None:
        self.sandbox.systemctl("restart", UNIT)
        self.wait_ready(timeout)

    def stop(self) -> None:
        self.sandbox.systemctl("stop", UNIT, check=False)

    def kill(self, signal: str = "SIGKILL") -> None:
        """Send ``signal`` to the daemon's main process only."""
        self.sandbox.systemctl("kill", "--kill-who=main", f"--signal={signal}", UNIT)

    def main_pid(self) -> int:
        result = self.sandbox.systemctl("show", "-P", "MainPID", UNIT)
        return int(result.stdout.strip() or 0)

    def wait_ready(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.get("/api/admin/deploys", timeout=2)
                return
            except requests.ConnectionError:
                time.sleep(0.05)
        raise AssertionError(f"ares-deployd did not answer:\n{self.journal()}")

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", 30)
        return self.http.get(self.base_url + path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", 30)
        return self.http.post(self.base_url + path, **kwargs)

    def deploy(self, target: str) -> str:
        """Start a deployment and return its id; fails the test if refused."""
        answer = self.post("/api/admin/deploy", json={"target": target})
        assert answer.status_code == 202, answer.text
        return answer.json()["id"]

    def partial_post(self, body: bytes, sent: int) -> socket.socket:
        """A deploy request whose body has arrived only up to ``sent`` bytes."""
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        head = (
            "POST /api/admin/deploy HTTP/1.1\r\nHost: test\r\n"
            f"X-Admin-Secret: {self.secret}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        sock.sendall(head + body[:sent])
        return sock

    def wait(self, deployment_id: str, timeout: float = 60) -> dict[str, Any]:
        """The deployment once it has ended."""
        deadline = time.monotonic() + timeout
        while True:
            body = self.get(f"/api/admin/deploy/{deployment_id}").json()
            if body["status"] != "running":
                return body
            if time.monotonic() > deadline:
                raise AssertionError(f"still running after {timeout}s: {body}")
            time.sleep(0.05)

    def journal(self, unit: str = UNIT) -> str:
        return self.sandbox.run(
            "journalctl", "-u", unit, "--no-pager", "-o", "cat", check=False
        ).stdout

    def processes_of(self, unit: str) -> list[str]:
        """The pids still in a unit's control group (empty when it is gone)."""
        cgroup = self.sandbox.path(f"/sys/fs/cgroup/system.slice/{unit}/cgroup.procs")
        try:
            return cgroup.read_text().split()
        except OSError:
            return []
