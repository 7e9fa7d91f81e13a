"""Notification bodies, signatures and the outbox, without a network."""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
from pathlib import Path

from ares_deployd.config import Notify
from ares_deployd.notify import Outbox, render, shown_url, sign

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
    outbox = Outbox(path)
    outbox.add("failed", "d1", hook(), "{}")
    outbox.add("failed", "d2", hook(), "{}")
    first = outbox.due(now=10**10, exclude=set(), limit=10)
    outbox.retry(first[0].id, due=10**11, error="refused")
    outbox.close()

    reopened = Outbox(path)

    due = reopened.due(now=10**10, exclude=set(), limit=10)
    assert [d.deployment for d in due] == ["d2"]
    reopened.done(due[0].id)
    assert reopened.pending() == 1
    assert reopened.due(now=10**12, exclude=set(), limit=10)[0].attempts == 1
