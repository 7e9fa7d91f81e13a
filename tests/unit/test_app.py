"""The HTTP boundary: authentication and the one JSON error format."""

from __future__ import annotations

import logging

import falcon
import falcon.testing
import pytest

from ares_deployd.api.app import FailureLimit, create_app, read_json
from ares_deployd.errors import DeploydError

SECRET = "correct horse"


class Echo:
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = read_json(req)

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"ok": True}


class Broken:
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        raise RuntimeError("secret internals")


class Refuses:
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        raise DeploydError(409, "target_busy", "Busy", id="abc")


@pytest.fixture
def client() -> falcon.testing.TestClient:
    app = create_app(
        lambda: SECRET,
        {
            "/api/admin/echo": Echo(),
            "/api/admin/broken": Broken(),
            "/refuse": Refuses(),
        },
    )
    return falcon.testing.TestClient(app, headers={"X-Admin-Secret": SECRET})


def test_auth_missing_secret_is_401_json(client, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        result = client.simulate_get("/api/admin/echo", headers={"X-Admin-Secret": ""})

    assert result.status_code == 401
    assert result.json == {
        "error": "unauthorized",
        "message": "A valid X-Admin-Secret header is required",
    }
    assert "no admin secret" in caplog.text


def test_auth_wrong_secret_is_401_and_not_logged(client, caplog) -> None:
    with caplog.at_level(logging.DEBUG):
        result = client.simulate_get(
            "/api/admin/echo", headers={"X-Admin-Secret": "guess-123"}
        )

    assert result.status_code == 401
    assert "wrong admin secret" in caplog.text
    assert "guess-123" not in caplog.text
    assert SECRET not in caplog.text


def test_auth_comes_before_routing(client) -> None:
    result = client.simulate_get("/api/admin/nowhere", headers={"X-Admin-Secret": "x"})

    assert result.status_code == 401


def test_auth_right_secret_passes(client) -> None:
    assert client.simulate_get("/api/admin/echo").json == {"ok": True}


def test_unknown_route_is_404_json(client) -> None:
    result = client.simulate_get("/api/admin/nowhere")

    assert result.status_code == 404
    assert result.json == {
        "error": "not_found",
        "message": "No such resource: /api/admin/nowhere",
    }


def test_unknown_long_route_is_404_with_the_path_cut(client) -> None:
    path = "/api/admin/" + "x" * 100_000

    result = client.simulate_get(path, headers={"X-Admin-Secret": SECRET})

    assert result.status_code == 404
    assert len(result.json["message"]) < 300
    assert result.json["message"].endswith("...")


def test_wrong_method_is_405_json(client) -> None:
    result = client.simulate_delete("/api/admin/echo")

    assert result.status_code == 405
    assert result.json["error"] == "method_not_allowed"
    assert "GET" in result.headers["Allow"]


def test_internal_error_is_500_without_traceback(client, caplog) -> None:
    with caplog.at_level(logging.ERROR):
        result = client.simulate_get("/api/admin/broken")

    assert result.status_code == 500
    assert result.json == {
        "error": "internal_error",
        "message": "The daemon hit an internal error",
    }
    assert "secret internals" not in result.text
    assert "secret internals" in caplog.text


def test_deployd_error_keeps_its_extra_fields(client) -> None:
    result = client.simulate_get("/refuse")

    assert result.status_code == 409
    assert result.json == {"error": "target_busy", "message": "Busy", "id": "abc"}


@pytest.mark.parametrize(
    ("body", "content_type", "status", "code"),
    [
        ("{", "application/json", 400, "bad_json"),
        ("[1, 2]", "application/json", 400, "not_an_object"),
        ('"target"', "application/json", 400, "not_an_object"),
        ("[" * 100000 + "]" * 100000, "application/json", 413, "body_too_large"),
        ("[" * 5000 + "]" * 5000, "application/json", 400, "bad_json"),
        (
            "target=ares",
            "application/x-www-form-urlencoded",
            415,
            "unsupported_media_type",
        ),
        ('{"target": "ares"}', None, 415, "unsupported_media_type"),
    ],
)
def test_read_json_rejects_bad_bodies(client, body, content_type, status, code) -> None:
    headers = {"Content-Type": content_type} if content_type else {}

    result = client.simulate_post("/api/admin/echo", body=body, headers=headers)

    assert result.status_code == status
    assert result.json["error"] == code
    assert set(result.json) == {"error", "message"}


def test_read_json_accepts_charset(client) -> None:
    result = client.simulate_post(
        "/api/admin/echo",
        body='{"target": "ares"}',
        headers={"Content-Type": "application/json; charset=utf-8"},
    )

    assert result.json == {"target": "ares"}


def test_failure_limit_blocks_after_ten_within_the_window() -> None:
    now = [1000.0]
    limit = FailureLimit(limit=10, window=60, clock=lambda: now[0])

    for _ in range(9):
        limit.failed("10.0.0.1")
    assert limit.blocked_for("10.0.0.1") == 0
    limit.failed("10.0.0.1")

    assert limit.blocked_for("10.0.0.1") == 60
    assert limit.blocked_for("10.0.0.2") == 0
    now[0] += 59.5
    assert limit.blocked_for("10.0.0.1") == 0.5
    now[0] += 0.5
    assert limit.blocked_for("10.0.0.1") == 0


def test_failure_limit_forgets_the_oldest_addresses() -> None:
    limit = FailureLimit(limit=1, tracked=2)

    for address in ("a", "b", "c"):
        limit.failed(address)

    assert limit.blocked_for("a") == 0
    assert limit.blocked_for("c") > 0


def test_auth_too_many_failures_is_429_for_that_address_only(client) -> None:
    wrong = {"X-Admin-Secret": "nope"}
    for _ in range(10):
        result = client.simulate_get(
            "/api/admin/echo", headers=wrong, remote_addr="10.9.9.9"
        )
        assert result.status_code == 401

    blocked = client.simulate_get("/api/admin/echo", remote_addr="10.9.9.9")
    other = client.simulate_get("/api/admin/echo", remote_addr="10.9.9.8")

    assert blocked.status_code == 429
    assert blocked.json["error"] == "too_many_attempts"
    assert 59 <= int(blocked.headers["Retry-After"]) <= 60
    assert other.status_code == 200
