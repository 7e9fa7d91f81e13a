"""Signed webhooks and Prometheus metrics, from a daemon under a real systemd."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from ares_deployd.notify import SEND_TIMEOUT
from tests.deployd import Deployd, free_port
from tests.integration.conftest import WORK

pytestmark = pytest.mark.integration

WEBHOOK_SECRET = "webhook-key-123"


class Receiver:
    """A webhook receiver on loopback that records what it is sent."""

    def __init__(self, port: int | None = None, hold: bool = False) -> None:
        self.received: list[dict] = []
        self.release = threading.Event()
        # What a holding receiver has been sent and not yet answered.
        self.held: list[dict] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if hold:
                    receiver.held.append(json.loads(body))
                    receiver.release.wait(30)
                receiver.received.append({"headers": dict(self.headers), "body": body})
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.port = port or free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def events(self, deployment_id: str) -> list[str]:
        return [
            json.loads(item["body"])["event"]
            for item in self.received
            if json.loads(item["body"]).get("deployment", {}).get("id") == deployment_id
        ]

    def wait_for(self, deployment_id: str, count: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while len(self.events(deployment_id)) < count:
            assert time.monotonic() < deadline, self.received
            time.sleep(0.05)

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def receivers() -> Iterator[dict[str, Receiver]]:
    made = {"signed": Receiver(), "slack": Receiver(), "hanging": Receiver(hold=True)}
    yield made
    for receiver in made.values():
        receiver.close()


@pytest.fixture(scope="module")
def late_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def daemon(
    deployd: Deployd, receivers: dict[str, Receiver], late_port: int, metrics_port: int
) -> Deployd:
    deployd.sandbox.write("/etc/ares-deployd/webhook-secret", WEBHOOK_SECRET + "\n")
    deployd.configure(
        f"""
[targets.good]
working_directory = "{WORK}"
user = "nobody"
steps = ["echo fine"]

[targets.bad]
working_directory = "{WORK}"
user = "nobody"
steps = ["exit 3"]

[services.bus]
unit = "dbus.service"

[[notify]]
url = "{receivers["signed"].url}"
secret_file = "/etc/ares-deployd/webhook-secret"

[[notify]]
url = "{receivers["slack"].url}"
format = "slack"
events = ["failed"]

[[notify]]
url = "{receivers["hanging"].url}"
targets = ["good"]

[targets.later]
working_directory = "{WORK}"
user = "nobody"
steps = ["true"]

[[notify]]
url = "http://127.0.0.1:{late_port}/hook"
events = ["succeeded"]
targets = ["later"]
""",
        server=f'metrics_listen = "127.0.0.1:{metrics_port}"\n',
    )
    deployd.restart()
    return deployd


@pytest.fixture(scope="module")
def earlier(daemon: Deployd) -> set[str]:
    """Deployments from before this module's daemon started: not in its counters."""
    listed = daemon.get("/api/admin/deploys", params={"limit": 200}).json()["deploys"]
    return {deployment["id"] for deployment in listed}


def test_notify_started_then_succeeded_signed(
    daemon: Deployd, receivers: dict[str, Receiver], earlier: set[str]
) -> None:
    signed = receivers["signed"]

    deployment_id = daemon.deploy("good")
    signed.wait_for(deployment_id, 2)

    assert signed.events(deployment_id) == ["started", "succeeded"]
    for item in signed.received:
        headers, body = item["headers"], item["body"]
        timestamp = headers["X-Ares-Timestamp"]
        expected = hmac.new(
            WEBHOOK_SECRET.encode(), timestamp.encode() + b"." + body, hashlib.sha256
        ).hexdigest()
        assert headers["X-Ares-Signature"] == f"sha256={expected}"
        assert abs(time.time() - int(timestamp)) < 300
    last = json.loads(signed.received[-1]["body"])
    assert last["deployment"]["status"] == "success"
    assert "output" not in last["deployment"]


def test_notify_failed_reaches_json_and_slack(
    daemon: Deployd, receivers: dict[str, Receiver]
) -> None:
    deployment_id = daemon.wait(daemon.deploy("bad"))["id"]

    receivers["signed"].wait_for(deployment_id, 2)
    slack = receivers["slack"]
    deadline = time.monotonic() + 30
    while not any(
        deployment_id[:8] in item["body"].decode() for item in slack.received
    ):
        assert time.monotonic() < deadline
        time.sleep(0.05)

    assert receivers["signed"].events(deployment_id) == ["started", "failed"]
    texts = [json.loads(item["body"])["text"] for item in slack.received]
    assert (
        f"ares-deployd: bad deployment {deployment_id[:8]} failed: step 1 "
        in (texts[-1])
    )
    assert all(set(json.loads(item["body"])) == {"text"} for item in slack.received)


def test_notify_hanging_receiver_does_not_slow_a_deployment(
    daemon: Deployd, receivers: dict[str, Receiver]
) -> None:
    hanging = receivers["hanging"]
    hanging.release.clear()
    begun = time.monotonic()

    deployment_id = daemon.deploy("good")
    done = daemon.wait(deployment_id)
    took = time.monotonic() - begun

    deadline = time.monotonic() + 10
    while not any(sent["deployment"]["id"] == deployment_id for sent in hanging.held):
        assert time.monotonic() < deadline, hanging.held
        time.sleep(0.05)
    hanging.release.set()
    assert done["status"] == "success"
    # Were a delivery in the deployment's way, its 5 s timeout would be in this.
    assert took < SEND_TIMEOUT - 1, took


def test_notify_receiver_down_gets_the_event_once_when_back(
    daemon: Deployd, late_port: int
) -> None:
    deployment_id = daemon.wait(daemon.deploy("later"))["id"]
    # Nothing listens yet: the first attempts are refused and retried.
    time.sleep(2)

    late = Receiver(port=late_port)
    try:
        late.wait_for(deployment_id, 1, timeout=60)
        time.sleep(3)
        events = late.events(deployment_id)
    finally:
        late.close()

    assert events == ["succeeded"]


def test_metrics_match_the_api(
    daemon: Deployd, metrics_port: int, earlier: set[str]
) -> None:
    text = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    families = {family.name: family for family in text_string_to_metric_families(text)}
    listed = [
        deployment
        for deployment in daemon.get(
            "/api/admin/deploys", params={"limit": 200}
        ).json()["deploys"]
        if deployment["id"] not in earlier
    ]

    finished = {
        (s.labels["target"], s.labels["status"]): s.value
        for s in families["ares_deployd_deployments_finished"].samples
        if s.name.endswith("_total")
    }
    expected: dict[tuple[str, str], float] = {}
    for deployment in listed:
        key = (deployment["target"], deployment["status"])
        expected[key] = expected.get(key, 0) + 1
    assert finished == expected
    started = {
        s.labels["target"]: s.value
        for s in families["ares_deployd_deployments_started"].samples
        if s.name.endswith("_total")
    }
    assert started == {
        target: sum(v for (t, _), v in expected.items() if t == target)
        for target in {t for t, _ in expected}
    }
    assert not families["ares_deployd_deployments_running"].samples
    states = {
        s.labels["state"]: s.value
        for s in families["ares_deployd_service_state"].samples
        if s.labels["service"] == "bus"
    }
    shown = daemon.get("/api/admin/services/bus").json()["status"]
    assert states == {state: int(state == shown) for state in states}
    assert set(states) == {"running", "degraded", "stopped"}
    durations = {
        s.labels["target"]: s.value
        for s in families["ares_deployd_deployment_duration_seconds"].samples
        if s.name.endswith("_count")
    }
    assert durations == {target: float(n) for target, n in started.items()}
    assert families["ares_deployd_streams_open"].samples[0].value == 0
    routes = {s.labels["route"] for s in families["ares_deployd_http_requests"].samples}
    assert "/api/admin/deploy/{id}" in routes
    sent = [
        s.value
        for s in families["ares_deployd_notifications"].samples
        if s.labels.get("result") == "sent" and s.name.endswith("_total")
    ]
    assert sent and sent[0] >= 4
