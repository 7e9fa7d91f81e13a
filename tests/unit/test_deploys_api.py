"""The deployment list and detail answers, read from a real SQLite store."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import falcon.testing
import pytest

from ares_deployd import buildlog
from ares_deployd.api import deploys
from ares_deployd.api.app import create_app
from ares_deployd.store import Store

ID = "0b6a3c1e-5d2f-4e8a-9c7b-1f2e3d4c5b6a"


@pytest.fixture
def parts(tmp_path: Path) -> tuple[falcon.testing.TestClient, Store]:
    store = Store(tmp_path / "history.sqlite3")
    (tmp_path / "logs").mkdir()
    # The resources read only the store and the state directory of a runner.
    runner: Any = SimpleNamespace(store=store, state_dir=tmp_path)
    app = create_app(
        lambda: "s",
        {
            "/api/admin/deploys": deploys.DeployList(runner),
            "/api/admin/deploy/{id}": deploys.DeploymentResource(runner),
        },
    )
    return falcon.testing.TestClient(app, headers={"X-Admin-Secret": "s"}), store


def test_list_answer_follows_every_change(parts) -> None:
    client, store = parts

    empty = client.simulate_get("/api/admin/deploys").json
    store.create(ID, "ares", "unit")
    running = client.simulate_get("/api/admin/deploys").json
    store.finish(ID, "success")
    done = client.simulate_get("/api/admin/deploys").json

    assert empty == {"deploys": []}
    assert [d["status"] for d in running["deploys"]] == ["running"]
    assert [d["status"] for d in done["deploys"]] == ["success"]


def test_detail_answer_follows_the_growing_log(parts, tmp_path: Path) -> None:
    client, store = parts
    store.create(ID, "ares", "unit")
    log = buildlog.log_path(tmp_path, ID)

    buildlog.append(log, "one\n")
    first = client.simulate_get(f"/api/admin/deploy/{ID}").json
    buildlog.append(log, "two\n")
    second = client.simulate_get(f"/api/admin/deploy/{ID}").json

    assert first["output"] == "one\n"
    assert second["output"] == "one\ntwo\n"
    assert second["finished_at"] is None


@pytest.mark.parametrize("bad", ["../../etc/passwd", ID.upper(), ID + "x", "%00"])
def test_detail_refuses_anything_but_a_canonical_id(parts, bad: str) -> None:
    client, _store = parts

    answer = client.simulate_get(f"/api/admin/deploy/{bad}")

    assert answer.status_code == 404
    assert answer.json["error"] == "not_found"
