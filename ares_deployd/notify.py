"""Notifications: deployment events POSTed to webhooks, signed, retried, durable.

Each event becomes one row per matching ``[[notify]]`` table in an outbox in the
history database, with its body fixed at the time of the event. A worker on the
daemon's loop delivers due rows on threads of its own, so a receiver that hangs
never holds up a deployment or a health check. A row is retried with backoff
until its ``retry_for`` window closes, then dropped with a warning; rows survive
a restart of the daemon. The rows of an event are queued in the transaction that
marks its deployment as told of it, so that a start can queue what a stopped run
had recorded and not queued yet, and nothing twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ares_deployd import __version__
from ares_deployd.config import Config, Notify
from ares_deployd.store import (
    CANCELLED,
    FAILED,
    RUNNING,
    SUCCESS,
    TOLD,
    Deployment,
    Store,
)

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Ares-Signature"
TIMESTAMP_HEADER = "X-Ares-Timestamp"
DELIVERY_HEADER = "X-Ares-Delivery"
SEND_TIMEOUT = 5.0
BACKOFF_CAP = 60.0
# Deliveries under way at once; each holds one thread of the pool for at most
# SEND_TIMEOUT.
PARALLEL = 4

FINISHED_EVENTS = {SUCCESS: "succeeded", FAILED: "failed", CANCELLED: "cancelled"}

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    event TEXT NOT NULL,
    deployment TEXT NOT NULL,
    url TEXT NOT NULL,
    secret_file TEXT,
    body TEXT NOT NULL,
    created REAL NOT NULL,
    give_up REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    due REAL NOT NULL,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (due);
"""


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """The signature header's value: HMAC-SHA256 of ``timestamp.body``."""
    digest = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + digest.hexdigest()


def shown_url(url: str) -> str:
    """A receiver's URL fit for a log: chat webhooks keep their secret in the path."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}/..." if parts.path.strip("/") else url


def render(hook: Notify, event: str, deployment: dict[str, Any]) -> str:
    """The body of one event for one receiver."""
    if hook.format == "slack":
        target, short = deployment["target"], deployment["id"][:8]
        text = f"ares-deployd: {target} deployment {short} {event.replace('_', ' ')}"
        if deployment.get("reason") and event != "succeeded":
            text += f": {deployment['reason']}"
        if deployment.get("revision"):
            text += f" (revision {deployment['revision'][:12]})"
        return json.dumps({"text": text})
    return json.dumps({"event": event, "deployment": deployment})


@dataclass
class Delivery:
    id: int
    event: str
    deployment: str
    url: str
    secret_file: str | None
    body: str
    created: float
    give_up: float
    attempts: int
    due: float
    last_error: str | None


class Outbox:
    """The rows waiting to be delivered; safe to share between threads."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(
            path, check_same_thread=False, isolation_level=None, timeout=10
        )
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(SCHEMA)

    def add(
        self, rows: list[tuple[str, str, Notify, str]], deployment: str, mark: str
    ) -> None:
        """Queue ``(event, deployment, hook, body)`` rows and mark ``deployment``
        as told of ``mark``, in one transaction: an event is queued exactly when
        it is marked, whatever stops the daemon."""
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT INTO outbox (event, deployment, url, secret_file, body,"
                    " created, give_up, due) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        (
                            event,
                            deployment_id,
                            hook.url,
                            str(hook.secret_file) if hook.secret_file else None,
                            body,
                            now,
                            now + hook.retry_for,
                            now,
                        )
                        for event, deployment_id, hook, body in rows
                    ],
                )
                self._db.execute(
                    "UPDATE deployments SET notified = ? WHERE id = ?",
                    (mark, deployment),
                )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def untold(self) -> list[str]:
        """The deployments whose last change of state was never queued: the
        daemon stopped between recording it and queueing its event."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT id FROM deployments WHERE notified IS NOT {TOLD} ORDER BY seq"
            ).fetchall()
        return [row["id"] for row in rows]

    def due(self, now: float, exclude: set[int], limit: int) -> list[Delivery]:
        """Up to ``limit`` rows due by ``now``, earliest first, but ``exclude``."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM outbox WHERE due <= ? ORDER BY due LIMIT ?",
                (now, limit + len(exclude)),
            ).fetchall()
        return [Delivery(**row) for row in rows if row["id"] not in exclude][:limit]

    def next_due(self) -> float | None:
        with self._lock:
            row = self._db.execute("SELECT MIN(due) AS due FROM outbox").fetchone()
        return row["due"]

    def done(self, delivery_id: int) -> None:
        """Take a row out: delivered, or given up on."""
        with self._lock:
            self._db.execute("DELETE FROM outbox WHERE id = ?", (delivery_id,))

    def retry(self, delivery_id: int, due: float, error: str) -> None:
        """Count a failed attempt and set when to try again."""
        with self._lock:
            self._db.execute(
                "UPDATE outbox SET attempts = attempts + 1, due = ?, last_error = ?"
                " WHERE id = ?",
                (due, error, delivery_id),
            )

    def pending(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def post(delivery: Delivery) -> str | None:
    """Send one delivery; None when the receiver took it, else what went wrong."""
    body = delivery.body.encode()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": f"ares-deployd/{__version__}",
        DELIVERY_HEADER: str(delivery.id),
    }
    if delivery.secret_file:
        try:
            secret = Path(delivery.secret_file).read_bytes().strip()
        except OSError as error:
            return f"cannot read {delivery.secret_file}: {error.strerror}"
        timestamp = str(int(time.time()))
        headers[TIMESTAMP_HEADER] = timestamp
        headers[SIGNATURE_HEADER] = sign(secret, timestamp, body)
    request = urllib.request.Request(delivery.url, body, headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=SEND_TIMEOUT) as response:
            response.read(65536)
    except urllib.error.HTTPError as error:
        return f"answered {error.code}"
    except (urllib.error.URLError, OSError) as error:
        return str(getattr(error, "reason", error))
    return None


class Notifier:
    """Turns deployment events into outbox rows and delivers them."""

    def __init__(
        self,
        config: Callable[[], Config],
        store: Store,
        outbox: Outbox,
        counted: Callable[[str], None] | None = None,
    ) -> None:
        self._config = config
        self._store = store
        self.outbox = outbox
        self._counted = counted or (lambda result: None)
        self._wake: asyncio.Event | None = None
        self._sending: set[int] = set()
        self._pool = ThreadPoolExecutor(PARALLEL, thread_name_prefix="notify")

    # Called on the loop thread by the runner.

    def started(self, deployment: Deployment) -> None:
        self._emit([("started", deployment)], deployment.id, "started")

    def finished(self, deployment: Deployment) -> None:
        events = []
        event = FINISHED_EVENTS.get(deployment.status)
        if event:
            events.append((event, deployment))
        if deployment.status == SUCCESS and deployment.rollback_of:
            undone = self._store.get(deployment.rollback_of)
            if undone is not None:
                events.append(("rolled_back", undone))
        self._emit(events, deployment.id, deployment.status)

    def catch_up(self) -> int:
        """Queue what a previous run recorded but never queued; how many.

        Call before deployments are followed again, so that nothing else
        queues meanwhile.
        """
        untold = self.outbox.untold()
        for deployment_id in untold:
            deployment = self._store.get(deployment_id)
            if deployment is None:
                continue
            log.info(
                "queueing the notification of deployment %s that a previous run "
                "left unsent",
                deployment_id,
            )
            if deployment.status == RUNNING:
                self.started(deployment)
            else:
                self.finished(deployment)
        return len(untold)

    def _emit(
        self, events: list[tuple[str, Deployment]], deployment_id: str, mark: str
    ) -> None:
        rows = []
        for event, deployment in events:
            shown = deployment.as_json()
            for hook in self._config().notify:
                if hook.wants(event, deployment.target):
                    rows.append(
                        (event, deployment.id, hook, render(hook, event, shown))
                    )
        # Marked even when no hook wants it: a hook added later is not sent the
        # past.
        self.outbox.add(rows, deployment_id, mark)
        if rows and self._wake is not None:
            self._wake.set()

    async def run(self) -> None:
        """Deliver due rows until cancelled."""
        self._wake = asyncio.Event()
        while True:
            self._wake.clear()
            now = time.time()
            free = PARALLEL - len(self._sending)
            for delivery in self.outbox.due(now, self._sending, max(free, 0)):
                self._sending.add(delivery.id)
                asyncio.ensure_future(self._deliver(delivery))
            upcoming = self.outbox.next_due()
            wait = 30.0 if upcoming is None else min(30.0, max(0.05, upcoming - now))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)

    def _send(self, delivery: Delivery) -> str | None:
        # On the sending thread: a delivery the receiver took leaves the outbox
        # at once, even when the daemon stops before the loop hears of it.
        error = post(delivery)
        if error is None:
            self.outbox.done(delivery.id)
        return error

    async def _deliver(self, delivery: Delivery) -> None:
        try:
            loop = asyncio.get_running_loop()
            error = await loop.run_in_executor(self._pool, self._send, delivery)
            if error is None:
                self._counted("sent")
                log.debug("delivered %s of %s", delivery.event, delivery.deployment)
                return
            self._counted("failed")
            backoff = min(BACKOFF_CAP, 2.0**delivery.attempts)
            if time.time() + backoff > delivery.give_up:
                self.outbox.done(delivery.id)
                self._counted("dropped")
                log.warning(
                    "dropped the %s notification of deployment %s to %s after %d "
                    "attempts: %s",
                    delivery.event,
                    delivery.deployment,
                    shown_url(delivery.url),
                    delivery.attempts + 1,
                    error,
                )
                return
            self.outbox.retry(delivery.id, time.time() + backoff, error)
            log.info(
                "notifying %s failed (%s); retrying in %.0fs",
                shown_url(delivery.url),
                error,
                backoff,
            )
        finally:
            self._sending.discard(delivery.id)
            if self._wake is not None:
                self._wake.set()

    def close(self) -> None:
        """Wait for the deliveries under way (each ends within SEND_TIMEOUT), so
        that none is sent again after a restart; the rest stay in the outbox."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.outbox.close()
