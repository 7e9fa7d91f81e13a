"""The history database: one running deployment per target, filters, pruning."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from ares_deployd.store import Busy, Store


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "history.sqlite3")


def test_store_create_refuses_a_second_running_deployment(store: Store) -> None:
    first = store.create("a", "ares", "unit-a")

    with pytest.raises(Busy) as caught:
        store.create("b", "ares", "unit-b")

    assert caught.value.running.id == first.id
    assert store.get("b") is None
    assert store.create("c", "eruka", "unit-c").status == "running"


def test_store_finish_frees_the_target_once(store: Store) -> None:
    store.create("a", "ares", "unit-a")

    assert store.finish("a", "failed", "step 1 `x` exited with status 2", 2, 1)
    assert not store.finish("a", "success")

    ended = store.get("a")
    assert ended is not None
    assert (ended.status, ended.exit_status, ended.failed_step) == ("failed", 2, 1)
    assert ended.summary()["finished_at"].endswith("Z")
    assert store.create("b", "ares", "unit-b").status == "running"


def test_store_list_filters_and_pages_newest_first(store: Store) -> None:
    for n in range(5):
        store.create(f"d{n}", "ares" if n % 2 else "eruka", f"u{n}")
        store.finish(f"d{n}", "success" if n < 3 else "failed")
    store.update("d1", revision="abc")

    assert [d.id for d in store.list()] == ["d4", "d3", "d2", "d1", "d0"]
    assert [d.id for d in store.list(target="ares")] == ["d3", "d1"]
    assert [d.id for d in store.list(status="failed")] == ["d4", "d3"]
    assert [d.id for d in store.list(revision="abc")] == ["d1"]
    third = store.get("d2")
    assert third is not None
    assert [d.id for d in store.list(before=third.seq, limit=1)] == ["d1"]


def test_store_prune_keeps_the_newest_and_running(store: Store) -> None:
    for n in range(5):
        store.create(f"d{n}", f"t{n}", f"u{n}")
        if n != 1:
            store.finish(f"d{n}", "success")

    pruned = store.prune(keep=2)

    assert sorted(pruned) == ["d0", "d2"]
    assert [d.id for d in store.list()] == ["d4", "d3", "d1"]


def test_store_last_good_revision_skips_failures(store: Store) -> None:
    for n, status in enumerate(("success", "success", "failed")):
        store.create(f"d{n}", "ares", f"u{n}")
        store.update(f"d{n}", revision=f"rev{n}")
        store.finish(f"d{n}", status)
    newest = store.create("d3", "ares", "u3")

    assert store.last_good_revision("ares", newest.seq) == "rev1"
    assert store.last_good_revision("eruka", newest.seq) is None


def test_store_opens_a_database_from_before_revisions(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE deployments (seq INTEGER PRIMARY KEY AUTOINCREMENT,"
            " id TEXT NOT NULL UNIQUE, target TEXT NOT NULL, status TEXT NOT NULL,"
            " unit TEXT NOT NULL, started REAL NOT NULL, finished REAL,"
            " phase TEXT NOT NULL DEFAULT 'build', reason TEXT, exit_status INTEGER,"
            " failed_step INTEGER, cancel_requested INTEGER NOT NULL DEFAULT 0)"
        )
        db.execute(
            "INSERT INTO deployments (id, target, status, unit, started)"
            " VALUES ('old', 'ares', 'success', 'u', 1.0)"
        )

    store = Store(path)

    old = store.get("old")
    assert old is not None and old.revision is None
    store.update("old", revision="abc")
    assert [d.id for d in store.list(revision="abc")] == ["old"]
