"""Authentication under attack, and the secret kept out of sight."""

from __future__ import annotations

import http.client
import json

import pytest

from tests.deployd import Deployd
from tests.integration.conftest import WORK

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def daemon(deployd: Deployd) -> Deployd:
    deployd.configure(
        f"""
[targets.quick]
working_directory = "{WORK}"
user = "nobody"
steps = ["echo quick"]
"""
    )
    deployd.restart()
    return deployd


def request_from(
    daemon: Deployd, source: str, path: str, secret: str | None
) -> tuple[int, dict[str, str], dict]:
    """One request from another loopback address, as another client would send."""
    connection = http.client.HTTPConnection(
        "127.0.0.1", daemon.port, timeout=10, source_address=(source, 0)
    )
    headers = {"X-Admin-Secret": secret} if secret is not None else {}
    try:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), json.loads(response.read())
    finally:
        connection.close()


def test_auth_ten_failures_block_only_that_address(daemon: Deployd) -> None:
    statuses = [
        request_from(daemon, "127.0.0.9", "/api/admin/deploys", "guess")[0]
        for _ in range(10)
    ]

    blocked, headers, body = request_from(
        daemon, "127.0.0.9", "/api/admin/deploys", daemon.secret
    )
    other, _, _ = request_from(
        daemon, "127.0.0.10", "/api/admin/deploys", daemon.secret
    )

    assert statuses == [401] * 10
    assert blocked == 429
    assert body["error"] == "too_many_attempts"
    assert 1 <= int(headers["Retry-After"]) <= 60
    assert other == 200
    assert daemon.get("/api/admin/deploys").status_code == 200


@pytest.mark.parametrize(
    "path",
    [
        "/api/admin/deploys",
        "/api/admin/deploy/00000000-0000-0000-0000-000000000000",
        "/api/admin/deploy/00000000-0000-0000-0000-000000000000/events",
        "/api/admin/services/any/logs?follow=1",
        "/api/admin/openapi.json",
        "/api/admin/nowhere",
        "/elsewhere",
    ],
)
def test_auth_every_path_needs_the_secret(daemon: Deployd, path: str) -> None:
    status, _, body = request_from(daemon, "127.0.0.11", path, None)

    assert status == 401
    assert body["error"] == "unauthorized"


def test_secret_never_in_journal_answers_or_process_list(daemon: Deployd) -> None:
    done = daemon.wait(daemon.deploy("quick"))
    refused = daemon.http.post(
        daemon.base_url + "/api/admin/deploy",
        json={"target": "nope"},
        headers={"X-Admin-Secret": daemon.secret + "x"},
        timeout=10,
    )
    answers = [refused.text, json.dumps(done)]
    answers.append(daemon.get("/api/admin/deploys").text)

    journal = daemon.sandbox.run(
        "journalctl", "--no-pager", "-o", "verbose", check=False
    ).stdout
    processes = daemon.sandbox.run("ps", "-eww", "-o", "args").stdout
    environment = daemon.sandbox.path(f"/proc/{daemon.main_pid()}/environ").read_bytes()

    assert "ares-deployd" in journal and "ares-deployd" in processes
    for text in (journal, processes, environment.decode(errors="replace"), *answers):
        assert daemon.secret not in text
