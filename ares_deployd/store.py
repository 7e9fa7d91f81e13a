"""Deployment history in SQLite, under the state directory.

Every change of state is one committed transaction before anyone is told of it.
A partial unique index allows one running deployment per target, so two requests
racing for the same target cannot both win.
"""

from __future__ import annotations

import functools
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ares_deployd.errors import DeploydError

log = logging.getLogger(__name__)

RUNNING = "running"
SUCCESS = "success"
FAILED = "failed"
CANCELLED = "cancelled"
STATUSES = (RUNNING, SUCCESS, FAILED, CANCELLED)

SCHEMA = """
CREATE TABLE IF NOT EXISTS deployments (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    target TEXT NOT NULL,
    status TEXT NOT NULL,
    unit TEXT NOT NULL,
    started REAL NOT NULL,
    finished REAL,
    phase TEXT NOT NULL DEFAULT 'build',
    reason TEXT,
    exit_status INTEGER,
    failed_step INTEGER,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    ref TEXT,
    revision_before TEXT,
    revision TEXT,
    rollback_of TEXT,
    rolled_back_by TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS one_running_per_target
    ON deployments (target) WHERE status = 'running';
CREATE INDEX IF NOT EXISTS by_target ON deployments (target, seq);
CREATE INDEX IF NOT EXISTS by_status ON deployments (status, seq);
"""

# Columns added since the first schema, with their types; a database made before
# them gains them on open.
ADDED_COLUMNS = {
    "ref": "TEXT",
    "revision_before": "TEXT",
    "revision": "TEXT",
    "rollback_of": "TEXT",
    "rolled_back_by": "TEXT",
    # The last event queued for the webhooks: "started", then the final status.
    # Set with the queueing itself (see notify.py), never shown by the API.
    "notified": "TEXT",
}
# The mark of a deployment whose webhooks have been told of its current state.
TOLD = "CASE status WHEN 'running' THEN 'started' ELSE status END"
INDEXES = "CREATE INDEX IF NOT EXISTS by_revision ON deployments (revision, seq);"


def rfc3339(timestamp: float | None) -> str | None:
    """A Unix time as the API shows it: UTC, whole seconds, with a ``Z``."""
    if timestamp is None:
        return None
    return _rfc3339(int(timestamp))


# Every listing formats the same few dozen times again: keep them.
@functools.lru_cache(maxsize=8192)
def _rfc3339(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


@dataclass
class Deployment:
    seq: int
    id: str
    target: str
    status: str
    unit: str
    started: float
    finished: float | None
    phase: str
    reason: str | None
    exit_status: int | None
    failed_step: int | None
    cancel_requested: int
    ref: str | None
    revision_before: str | None
    revision: str | None
    rollback_of: str | None
    rolled_back_by: str | None

    def summary(self) -> dict[str, Any]:
        """The fields every listing shows, as the API names them."""
        return {
            "id": self.id,
            "target": self.target,
            "status": self.status,
            "started_at": rfc3339(self.started),
            "finished_at": rfc3339(self.finished),
            "reason": self.reason,
            "exit_status": self.exit_status,
            "ref": self.ref,
            "revision_before": self.revision_before,
            "revision": self.revision,
            "rollback_of": self.rollback_of,
            "rolled_back_by": self.rolled_back_by,
        }

    def as_json(self) -> dict[str, Any]:
        """Everything the API shows of a deployment but its output."""
        return {
            **self.summary(),
            "unit": self.unit,
            "phase": self.phase,
            "failed_step": self.failed_step,
        }


COLUMNS = ", ".join(field.name for field in fields(Deployment))


class Busy(Exception):
    """The target already has a running deployment, ``running``."""

    def __init__(self, running: Deployment) -> None:
        super().__init__(running.id)
        self.running = running


# Kept free beside the database, and given up when the disk fills, so that the
# outcome of the deployments in flight can still be committed.
RESERVE_BYTES = 1024 * 1024


def _disk_full(error: sqlite3.OperationalError) -> bool:
    return "full" in str(error) or "disk I/O" in str(error)


class Store:
    """The history database; safe to share between threads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.reserve = path.parent / "reserve"
        if not self.reserve.exists():
            try:
                self.reserve.write_bytes(b"\0" * RESERVE_BYTES)
            except OSError:
                self.reserve.unlink(missing_ok=True)
        self._db = sqlite3.connect(
            path, check_same_thread=False, isolation_level=None, timeout=10
        )
        self._lock = threading.Lock()
        # Goes up with every committed change: answers made from an older one
        # are stale.
        self.generation = 0
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
            present = {
                row[1] for row in self._db.execute("PRAGMA table_info(deployments)")
            }
            for column, kind in ADDED_COLUMNS.items():
                if column not in present:
                    self._db.execute(
                        f"ALTER TABLE deployments ADD COLUMN {column} {kind}"
                    )
            if "notified" not in present:
                # A history older than the mark: its events were dealt with then.
                self._db.execute(f"UPDATE deployments SET notified = {TOLD}")
            self._db.executescript(INDEXES)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One committed transaction; a full disk is a 507 ``state_dir_full``."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
                self.generation += 1
            except sqlite3.OperationalError as error:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                if not _disk_full(error):
                    raise
                self._release_reserve()
                raise DeploydError(
                    507,
                    "state_dir_full",
                    f"The state directory {self.path.parent} has no space left",
                ) from None

    def _release_reserve(self) -> None:
        if self.reserve.exists():
            self.reserve.unlink(missing_ok=True)
            log.error(
                "%s is full: gave up its %d KiB reserve to record deployments; "
                "free some space",
                self.path.parent,
                RESERVE_BYTES // 1024,
            )

    def _one(self, sql: str, args: tuple[Any, ...]) -> Deployment | None:
        with self._lock:
            row = self._db.execute(sql, args).fetchone()
        return Deployment(*row) if row else None

    def create(
        self,
        deployment_id: str,
        target: str,
        unit: str,
        ref: str | None = None,
        rollback_of: str | None = None,
    ) -> Deployment:
        """Record a new running deployment.

        Raises:
            Busy: the target has a running deployment already.
        """
        try:
            with self._transaction() as db:
                db.execute(
                    "INSERT INTO deployments"
                    " (id, target, status, unit, started, ref, rollback_of)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        deployment_id,
                        target,
                        RUNNING,
                        unit,
                        time.time(),
                        ref,
                        rollback_of,
                    ),
                )
        except sqlite3.IntegrityError:
            running = self.running_for(target)
            if running is None:
                raise
            raise Busy(running) from None
        created = self.get(deployment_id)
        assert created is not None
        return created

    def get(self, deployment_id: str) -> Deployment | None:
        """The deployment with that id, or None when there is none."""
        return self._one(
            f"SELECT {COLUMNS} FROM deployments WHERE id = ?", (deployment_id,)
        )

    def running_for(self, target: str) -> Deployment | None:
        """The deployment of ``target`` that is running, if one is."""
        return self._one(
            f"SELECT {COLUMNS} FROM deployments WHERE target = ? AND status = ?",
            (target, RUNNING),
        )

    def running(self) -> list[Deployment]:
        """Every deployment still running, oldest first."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {COLUMNS} FROM deployments WHERE status = ? ORDER BY seq",
                (RUNNING,),
            ).fetchall()
        return [Deployment(*row) for row in rows]

    def latest(self) -> Deployment | None:
        """The newest deployment of all, or None in an empty history."""
        return self._one(
            f"SELECT {COLUMNS} FROM deployments ORDER BY seq DESC LIMIT 1", ()
        )

    def list(
        self,
        *,
        limit: int = 20,
        target: str | None = None,
        status: str | None = None,
        revision: str | None = None,
        before: int | None = None,
    ) -> list[Deployment]:
        """The newest deployments first, filtered; ``before`` is a ``seq``."""
        where, args = [], []
        filters = (("target", target), ("status", status), ("revision", revision))
        for column, value in filters:
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if before is not None:
            where.append("seq < ?")
            args.append(before)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {COLUMNS} FROM deployments {clause} ORDER BY seq DESC LIMIT ?",
                (*args, limit),
            ).fetchall()
        return [Deployment(*row) for row in rows]

    def update(self, deployment_id: str, **changes: Any) -> None:
        """Change fields of a running deployment (phase, cancel request, ...)."""
        columns = ", ".join(f"{column} = ?" for column in changes)
        with self._transaction() as db:
            db.execute(
                f"UPDATE deployments SET {columns} WHERE id = ?",
                (*changes.values(), deployment_id),
            )

    def finish(
        self,
        deployment_id: str,
        status: str,
        reason: str | None = None,
        exit_status: int | None = None,
        failed_step: int | None = None,
        rolled_back_by: str | None = None,
    ) -> bool:
        """End a running deployment; False when it had ended already."""
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE deployments SET status = ?, finished = ?, reason = ?,"
                " exit_status = ?, failed_step = ?, rolled_back_by = ?,"
                " phase = 'done' WHERE id = ? AND status = ?",
                (
                    status,
                    time.time(),
                    reason,
                    exit_status,
                    failed_step,
                    rolled_back_by,
                    deployment_id,
                    RUNNING,
                ),
            )
        return cursor.rowcount == 1

    def last_good_revision(self, target: str, before: int) -> str | None:
        """The revision of the newest successful deployment of ``target`` that
        came before the deployment with ``seq`` ``before``."""
        with self._lock:
            row = self._db.execute(
                "SELECT revision FROM deployments WHERE target = ? AND status = ?"
                " AND revision IS NOT NULL AND seq < ? ORDER BY seq DESC LIMIT 1",
                (target, SUCCESS, before),
            ).fetchone()
        return row[0] if row else None

    def prune(self, keep: int) -> list[str]:
        """Delete finished deployments beyond the newest ``keep``; their ids."""
        with self._transaction() as db:
            rows = db.execute(
                "SELECT id FROM deployments WHERE status != ? AND seq <= ("
                " SELECT seq FROM deployments ORDER BY seq DESC LIMIT 1 OFFSET ?)",
                (RUNNING, keep),
            ).fetchall()
            ids = [row[0] for row in rows]
            db.executemany("DELETE FROM deployments WHERE id = ?", [(i,) for i in ids])
        return ids
