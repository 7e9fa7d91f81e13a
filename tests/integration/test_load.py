"""A minute of mixed reads at about 200 a second while deployments run: every
answer a 200, every deployment in the history once with the status it ended
with, and the latency printed and written out for the README."""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from tests.deployd import Deployd
from tests.integration.conftest import WORK

pytestmark = pytest.mark.integration

DURATION = 60.0
RATE = 200.0
CLIENTS = 4
MOST_REQUESTS = 13000
TARGETS = ("alpha", "beta", "gamma")
SERVICES = ("pulse", "steady")

BUILD = "for i in $(seq 1 200); do echo building line $i; sleep 0.1; done"
PULSE_UNIT = """\
[Service]
ExecStart=/bin/sh -c 'i=0; while true; do i=$((i+1)); echo pulse $i; sleep 0.5; done'
"""
STEADY_UNIT = """\
[Service]
ExecStart=/bin/sh -c 'echo steady up; exec sleep infinity'
"""


def config() -> str:
    tables = [
        f'[targets.{name}]\nworking_directory = "{WORK}"\nuser = "nobody"\n'
        f"steps = [{json.dumps(BUILD)}]\n"
        for name in TARGETS
    ]
    tables += [
        f'[services.{name}]\nunit = "load-{name}.service"\n' for name in SERVICES
    ]
    return "\n".join(tables)


@pytest.fixture(scope="module")
def daemon(deployd: Deployd) -> Deployd:
    units = {"pulse": PULSE_UNIT, "steady": STEADY_UNIT}
    for name, text in units.items():
        deployd.sandbox.write(f"/etc/systemd/system/load-{name}.service", text)
    deployd.sandbox.systemctl("daemon-reload")
    deployd.sandbox.systemctl("restart", *(f"load-{name}.service" for name in units))
    deployd.configure(config())
    deployd.restart()
    return deployd


@dataclass
class Deployments:
    """Keeps one deployment of each target running, and what each ended as."""

    daemon: Deployd
    started: list[str] = field(default_factory=list)
    ended: dict[str, str] = field(default_factory=dict)
    running: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, target: str) -> None:
        answer = self.daemon.post("/api/admin/deploy", json={"target": target})
        if answer.status_code != 202:
            self.problems.append(f"POST {target}: {answer.status_code} {answer.text}")
            return
        with self.lock:
            self.started.append(answer.json()["id"])
            self.running[target] = answer.json()["id"]

    def ids(self) -> list[str]:
        with self.lock:
            return list(self.started)

    def keep_running(self, stop: threading.Event) -> None:
        for target in TARGETS:
            self.start(target)
        while not stop.wait(0.2):
            for target, deployment_id in list(self.running.items()):
                answer = self.daemon.get(f"/api/admin/deploy/{deployment_id}")
                if answer.status_code != 200:
                    self.problems.append(f"poll: {answer.status_code} {answer.text}")
                    continue
                status = answer.json()["status"]
                if status != "running":
                    self.ended[deployment_id] = status
                    self.start(target)

    def cancel_all(self) -> None:
        """Cancel what still runs; each then ends as cancelled."""
        for deployment_id in self.running.values():
            if deployment_id in self.ended:
                continue
            answer = self.daemon.post(f"/api/admin/deploy/{deployment_id}/cancel")
            if answer.status_code == 200:
                self.ended[deployment_id] = "cancelled"
            else:
                # It ended on its own between the last look and the cancel.
                self.ended[deployment_id] = self.daemon.wait(deployment_id)["status"]


@dataclass
class Load:
    """Requests from several clients under one shared pace."""

    daemon: Deployd
    paths: Callable[[int], str]
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    sent: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _next(self, start: float, deadline: float) -> int | None:
        """The number of the next request once its turn has come, else None."""
        with self.lock:
            if self.sent >= MOST_REQUESTS:
                return None
            number = self.sent
            self.sent += 1
        due = start + number / RATE
        if due >= deadline:
            return None
        time.sleep(max(0.0, due - time.monotonic()))
        return number

    def client(self, start: float, deadline: float) -> None:
        session = requests.Session()
        session.headers["X-Admin-Secret"] = self.daemon.secret
        while (number := self._next(start, deadline)) is not None:
            path = self.paths(number)
            began = time.monotonic()
            try:
                answer = session.get(self.daemon.base_url + path, timeout=10)
                status = str(answer.status_code)
            except requests.RequestException as error:
                status = type(error).__name__
            took = time.monotonic() - began
            with self.lock:
                self.latencies.append(took)
                if status != "200":
                    self.errors.append(f"GET {path}: {status}")


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def test_load_mixed_reads_while_deploying_lose_nothing(
    daemon: Deployd, tmp_path_factory: pytest.TempPathFactory
) -> None:
    deployments = Deployments(daemon)
    stop = threading.Event()
    keeper = threading.Thread(target=deployments.keep_running, args=(stop,))
    keeper.start()
    while len(deployments.ids()) < len(TARGETS) and keeper.is_alive():
        time.sleep(0.05)

    def paths(number: int) -> str:
        ids = deployments.ids()
        some = ids[number % len(ids)]
        service = SERVICES[number % len(SERVICES)]
        return [
            "/api/admin/deploys",
            f"/api/admin/deploy/{some}",
            "/api/admin/services",
            f"/api/admin/services/{service}/logs?lines=20",
            f"/api/admin/deploy/{some}/log",
        ][number % 5]

    load = Load(daemon, paths)
    start = time.monotonic()
    clients = [
        threading.Thread(target=load.client, args=(start, start + DURATION))
        for _ in range(CLIENTS)
    ]
    for client in clients:
        client.start()
    for client in clients:
        client.join(DURATION + 15)
    elapsed = time.monotonic() - start
    stop.set()
    keeper.join(15)
    deployments.cancel_all()

    history = daemon.get("/api/admin/deploys?limit=200").json()["deploys"]
    listed = [row["id"] for row in history]
    statuses = {row["id"]: row["status"] for row in history}
    figures = {
        "requests": len(load.latencies),
        "seconds": round(elapsed, 1),
        "rate": round(len(load.latencies) / elapsed, 1),
        "p50_ms": round(quantile(load.latencies, 0.5) * 1000, 1),
        "p99_ms": round(quantile(load.latencies, 0.99) * 1000, 1),
        "max_ms": round(max(load.latencies) * 1000, 1),
        "mean_ms": round(statistics.fmean(load.latencies) * 1000, 1),
        "errors": len(load.errors),
        "deployments": len(deployments.started),
        "succeeded": sum(s == "success" for s in deployments.ended.values()),
        "cancelled": sum(s == "cancelled" for s in deployments.ended.values()),
    }
    report = Path(tmp_path_factory.mktemp("load")) / "load.json"
    report.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"\nload: {json.dumps(figures)} (written to {report})")

    assert not any(client.is_alive() for client in clients)
    assert load.errors == [], load.errors[:20]
    assert deployments.problems == [], deployments.problems[:20]
    assert len(load.latencies) >= 0.9 * RATE * DURATION
    assert len(load.latencies) <= MOST_REQUESTS
    assert elapsed <= DURATION + 10
    assert len(listed) == len(set(listed))
    for deployment_id in deployments.started:
        assert listed.count(deployment_id) == 1, deployment_id
        assert statuses[deployment_id] == deployments.ended[deployment_id]
    # A build takes about 20 s: those that ended on their own succeeded, and
    # three were cut short at the end.
    assert figures["cancelled"] <= len(TARGETS)
    assert figures["succeeded"] == len(deployments.started) - figures["cancelled"]
    assert figures["succeeded"] >= len(TARGETS)
    assert quantile(load.latencies, 0.99) < 2.0
