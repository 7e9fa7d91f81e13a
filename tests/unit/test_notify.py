"""Notification bodies, signatures and the outbox, without a network."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import http.server
import json
import sqlite3
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ares_deployd import store as store_module
from ares_deployd.config import Notify
from ares_deployd.notify import Notifier, Outbox, render, shown_url, sign
from ares_deployd.store import Deployment, Store

DEPLOYMENT = {
    "id": "12345678-aaaa-bbbb-cccc-1234567890ab",
    "target": "ares",
    "status": "failed",
    "reason": "step 2 `cargo build --release` exited with status 101",
    "revision": "0123456789abcdef0123",
}


def hook(**changes: object) -> Notify:
    values: dict[str, object] = {
        "url": "http://127.0.0.1:9/hook",
        "events": ("failed",),
        "targets": None,
        "secret_file": None,
        "format": "json",
        "retry_for": 600,
    }
    values.update(changes)
    return Notify(**values)  # type: ignore[arg-type]


def test_sign_matches_openssl(tmp_path: Path) -> None:
    body = b'{"event": "failed"}'

    ours = sign(b"key", "1700000000", body)

    signed = tmp_path / "signed"
    signed.write_bytes(b"1700000000." + body)
    openssl = subprocess.run(
        ["openssl", "dgst", "-sha256", "-hmac", "key", "-r", str(signed)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert ours == "sha256=" + openssl.stdout.split()[0]
    expected = hmac.new(b"key", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert ours == f"sha256={expected}"


def test_render_json_carries_event_and_deployment() -> None:
    body = json.loads(render(hook(), "failed", DEPLOYMENT))

    assert body == {"event": "failed", "deployment": DEPLOYMENT}


def test_render_slack_is_one_line_of_text() -> None:
    body = json.loads(render(hook(format="slack"), "failed", DEPLOYMENT))

    assert body == {
        "text": "ares-deployd: ares deployment 12345678 failed: step 2 "
        "`cargo build --release` exited with status 101 (revision 0123456789ab)"
    }


def test_notify_wants_only_its_events_and_targets() -> None:
    picky = hook(events=("failed", "rolled_back"), targets=("ares",))

    assert picky.wants("failed", "ares")
    assert not picky.wants("failed", "eruka")
    assert not picky.wants("started", "ares")


def test_shown_url_hides_the_path_that_may_hold_a_token() -> None:
    assert shown_url("https://hooks.example.org/services/T0/B0/XYZ") == (
        "https://hooks.example.org/..."
    )
    assert shown_url("http://127.0.0.1:9000") == "http://127.0.0.1:9000"


def test_outbox_keeps_rows_until_done(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    store = Store(path)
    outbox = Outbox(path)
    for deployment_id in ("d1", "d2"):
        store.create(deployment_id, deployment_id, "unit")
        outbox.add([("started", deployment_id, hook(), "{}")], deployment_id, "started")
    first = outbox.due(now=10**10, exclude=set(), limit=10)
    outbox.retry(first[0].id, due=10**11, error="refused")
    outbox.close()

    reopened = Outbox(path)

    due = reopened.due(now=10**10, exclude=set(), limit=10)
    assert [d.deployment for d in due] == ["d2"]
    reopened.done(due[0].id)
    assert reopened.pending() == 1
    assert reopened.due(now=10**12, exclude=set(), limit=10)[0].attempts == 1


def notifier_for(path: Path, *hooks: Notify) -> Notifier:
    config: Any = SimpleNamespace(notify=hooks)
    return Notifier(lambda: config, Store(path), Outbox(path))


def test_notifier_catches_up_once_on_an_end_it_never_queued(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    before = notifier_for(path, hook(events=("started", "failed")))
    for deployment_id in ("told", "untold"):
        before._store.create(deployment_id, deployment_id, "unit")
        before.started(before._store.get(deployment_id))  # type: ignore[arg-type]
        before._store.finish(deployment_id, "failed", "exit 3")
    # The daemon stopped after recording the second end, before queueing it.
    before.finished(before._store.get("told"))  # type: ignore[arg-type]
    before.outbox.close()

    after = notifier_for(path, hook(events=("started", "failed")))

    assert after.catch_up() == 1
    assert after.catch_up() == 0
    queued = after.outbox.due(now=10**10, exclude=set(), limit=10)
    assert sorted((d.deployment, d.event) for d in queued) == [
        ("told", "failed"),
        ("told", "started"),
        ("untold", "failed"),
        ("untold", "started"),
    ]


def test_notifier_marks_events_no_hook_wants(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    notifier = notifier_for(path)
    notifier._store.create("d1", "app", "unit")

    notifier.started(notifier._store.get("d1"))  # type: ignore[arg-type]

    assert notifier.outbox.pending() == 0
    assert notifier.outbox.untold() == []


def test_history_from_before_the_mark_is_not_sent_again(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(store_module.SCHEMA)
    old.execute(
        "INSERT INTO deployments (id, target, status, unit, started, finished)"
        " VALUES ('old', 'app', 'success', 'unit', 1, 2)"
    )
    old.commit()
    old.close()

    notifier = notifier_for(path, hook(events=("succeeded",)))

    assert notifier.catch_up() == 0
    assert notifier.outbox.pending() == 0


class SlowReceiver(http.server.BaseHTTPRequestHandler):
    """Takes each POST, then answers only after a while."""

    received: list[bytes] = []
    arrived = threading.Event()

    def do_POST(self) -> None:
        self.received.append(self.rfile.read(int(self.headers["Content-Length"])))
        self.arrived.set()
        time.sleep(0.5)
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_notifier_stopped_mid_delivery_does_not_send_it_again(
    tmp_path: Path,
) -> None:
    receiver = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowReceiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{receiver.server_port}/hook"
    path = tmp_path / "history.sqlite3"
    notifier = notifier_for(path, hook(url=url, events=("started",)))
    deployment = Deployment(
        1, DEPLOYMENT["id"], "ares", "running", "unit", 0.0, None, "build",
        *(None,) * 3, 0, *(None,) * 5,
    )  # fmt: skip
    loop = asyncio.new_event_loop()
    # Held, so that the task is not collected while it runs.
    _delivering = loop.create_task(notifier.run())
    loop.call_soon(notifier.started, deployment)

    loop.run_until_complete(asyncio.to_thread(SlowReceiver.arrived.wait, 10))
    # As the daemon's stop does: its loop ends with the delivery under way.
    pending = asyncio.all_tasks(loop)
    for task in pending:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.close()
    notifier.close()
    receiver.shutdown()

    assert len(SlowReceiver.received) == 1
    assert json.loads(SlowReceiver.received[0])["event"] == "started"
    assert Outbox(path).pending() == 0
