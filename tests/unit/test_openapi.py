"""The OpenAPI document against the daemon's real route table and answers."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import falcon
import falcon.routing
import falcon.testing
import jsonschema
import pytest
from openapi_spec_validator import OpenAPIV31SpecValidator

from ares_deployd import __version__, daemon
from ares_deployd import config as configuration
from ares_deployd.api import deploys
from ares_deployd.api.app import create_app
from ares_deployd.api.openapi import DOCUMENT
from ares_deployd.monitor import Health, ServiceView, UnitState

SECRET = "open sesame"
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
CONFIG = """\
[server]
listen = "127.0.0.1:3001"
state_dir = "{state}"

[targets.ares]
working_directory = "/"
user = "nobody"
steps = ["echo hi"]

[services.ares]
unit = "ares.service"
health_url = "http://127.0.0.1:9/health"

[services.admin]
unit = "admin.service"
port = 8080
"""


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return json.loads(DOCUMENT.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[daemon.Daemon]:
    """A daemon built from a configuration, not started: nothing reaches systemd."""
    where = tmp_path_factory.mktemp("openapi")
    path = where / "config.toml"
    path.write_text(CONFIG.format(state=where / "state"))
    made = daemon.Daemon(configuration.load(str(path)), SECRET)
    made.runner.prepare()
    yield made
    made.stop()


def router_templates(app: falcon.App) -> dict[str, object]:
    """Every URI template the app's router holds, with its resource."""
    found: dict[str, object] = {}
    nodes = list(app._router._roots)
    while nodes:
        node = nodes.pop()
        if node.resource is not None:
            found[node.uri_template] = node.resource
        nodes.extend(node.children)
    return found


@pytest.fixture(scope="module")
def app(built: daemon.Daemon) -> falcon.App:
    return create_app(lambda: SECRET, built.routes())


@pytest.fixture(scope="module")
def client(app: falcon.App) -> falcon.testing.TestClient:
    return falcon.testing.TestClient(app, headers={"X-Admin-Secret": SECRET})


def operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict]]:
    for path, item in document["paths"].items():
        for method in METHODS:
            if method in item:
                yield path, method, item[method]


def sample_path(template: str) -> str:
    return re.sub(r"\{[^}]+\}", "x1", template)


def schema_of(document: dict[str, Any], name: str) -> dict[str, Any]:
    """A named schema that can be checked on its own, its references resolved."""
    return {
        "$ref": f"#/components/schemas/{name}",
        "components": document["components"],
    }


def response_schema(
    document: dict[str, Any], path: str, method: str, status: int, media: str
) -> dict[str, Any]:
    responses = document["paths"][path][method]["responses"]
    answer = responses[str(status)]
    if "$ref" in answer:
        answer = document["components"]["responses"][answer["$ref"].split("/")[-1]]
    schema = answer["content"][media]["schema"]
    return {**schema, "components": document["components"]}


def assert_valid(instance: Any, schema: dict[str, Any]) -> None:
    jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    ).validate(instance)


def test_openapi_document_is_valid_openapi_3_1(document: dict[str, Any]) -> None:
    OpenAPIV31SpecValidator(document).validate()

    assert document["openapi"].startswith("3.1.")
    assert document["info"]["version"] == __version__


def test_openapi_document_keeps_its_canonical_form() -> None:
    text = DOCUMENT.read_text(encoding="utf-8")

    canonical = json.dumps(
        json.loads(text), indent=2, sort_keys=True, ensure_ascii=False
    )

    assert text == canonical + "\n", "regenerate with sorted keys and 2-space indent"


def test_openapi_every_operation_requires_the_admin_secret(
    document: dict[str, Any],
) -> None:
    scheme = document["components"]["securitySchemes"]["adminSecret"]

    assert scheme == {**scheme, "type": "apiKey", "in": "header"}
    assert scheme["name"] == "X-Admin-Secret"
    assert document["security"] == [{"adminSecret": []}]
    for path, method, operation in operations(document):
        assert operation.get("security") == [{"adminSecret": []}], (method, path)
        assert {"401", "429"} <= set(operation["responses"]), (method, path)


def test_openapi_every_documented_route_is_served(
    document: dict[str, Any], app: falcon.App
) -> None:
    for path, item in document["paths"].items():
        found = app._router.find(sample_path(path))

        assert found is not None, f"{path} is documented but not routed"
        resource, _, _, template = found
        assert template == path
        served = set(falcon.routing.map_http_methods(resource))
        documented = {method.upper() for method in METHODS if method in item}
        assert served == documented, path


def test_openapi_every_route_is_documented(
    document: dict[str, Any], built: daemon.Daemon, app: falcon.App
) -> None:
    routes = router_templates(app)

    assert set(routes) == set(built.routes())
    for template, resource in routes.items():
        assert template in document["paths"], f"{template} is routed but undocumented"
        item = document["paths"][template]
        for method in falcon.routing.map_http_methods(resource):
            assert method.lower() in item, f"{method} {template} is undocumented"


def test_openapi_every_operation_has_its_own_id(document: dict[str, Any]) -> None:
    ids = [operation["operationId"] for _, _, operation in operations(document)]

    assert len(ids) == len(set(ids))


def test_openapi_every_error_answer_has_code_and_message(
    document: dict[str, Any],
) -> None:
    for path, method, operation in operations(document):
        for status in operation["responses"]:
            if int(status) < 400:
                continue
            schema = response_schema(
                document, path, method, int(status), "application/json"
            )
            bodies = schema.get("oneOf", [schema])
            for body in bodies:
                if "$ref" in body:
                    body = document["components"]["schemas"][
                        body["$ref"].split("/")[-1]
                    ]
                assert {"error", "message"} <= set(body["required"]), (method, path)


def test_openapi_document_is_what_the_daemon_serves(
    client: falcon.testing.TestClient, document: dict[str, Any]
) -> None:
    answer = client.simulate_get("/api/admin/openapi.json")
    refused = client.simulate_get(
        "/api/admin/openapi.json", headers={"X-Admin-Secret": "wrong"}
    )

    assert answer.status_code == 200
    assert answer.headers["content-type"] == "application/json"
    assert answer.json == document
    assert refused.status_code == 401
    assert_valid(
        refused.json,
        response_schema(
            document, "/api/admin/openapi.json", "get", 401, "application/json"
        ),
    )


def test_openapi_deployment_answers_match_their_schemas(
    built: daemon.Daemon, client: falcon.testing.TestClient, document: dict[str, Any]
) -> None:
    running = built.store.create("0b6e1c1e-8a2f-4b8e-9d41-3c5f0a7e9b21", "ares", "u")
    finished = built.store.create("7d2a9f40-1c3b-4e5d-8f6a-9b0c1d2e3f4a", "web", "u")
    built.store.finish(finished.id, "failed", "step 1 exited", 7, 1)
    finished = built.store.get(finished.id)
    assert finished is not None

    listed = client.simulate_get("/api/admin/deploys")
    one = client.simulate_get(f"/api/admin/deploy/{running.id}")
    missing = client.simulate_get("/api/admin/deploy/not-an-id")
    bad = client.simulate_get("/api/admin/deploys", params={"limit": "0"})

    assert listed.status_code == 200 and len(listed.json["deploys"]) == 2
    assert_valid(listed.json, schema_of(document, "DeploymentList"))
    assert one.status_code == 200
    assert_valid(one.json, schema_of(document, "DeploymentDetail"))
    assert_valid(
        deploys.detail(built.runner, finished), schema_of(document, "DeploymentDetail")
    )
    assert_valid(finished.as_json(), schema_of(document, "Deployment"))
    assert_valid(
        deploys.started(finished, "started"), schema_of(document, "StartedDeployment")
    )
    assert missing.status_code == 404
    assert_valid(
        missing.json,
        response_schema(
            document, "/api/admin/deploy/{id}", "get", 404, "application/json"
        ),
    )
    assert bad.status_code == 400
    assert_valid(
        bad.json,
        response_schema(document, "/api/admin/deploys", "get", 400, "application/json"),
    )


def test_openapi_service_views_match_their_schemas(
    built: daemon.Daemon, document: dict[str, Any]
) -> None:
    services = built.config.services
    active = UnitState("loaded", "active", "running", 1773410622000000, 4242, "/x")
    views = [
        ServiceView(
            services["ares"],
            active,
            Health("failing", "answered 503", 1.0e9),
            (8000, 8001),
        ),
        ServiceView(services["ares"], UnitState(), Health("unknown"), ()),
        ServiceView(services["admin"], UnitState("not-found"), None, ()),
    ]

    for view in views:
        assert_valid(view.summary(), schema_of(document, "ServiceSummary"))
        assert_valid(view.detail(), schema_of(document, "ServiceDetail"))
        for verb in ("start", "stop", "restart"):
            result = {"action": verb, "job": "done", **view.detail()}
            assert_valid(result, schema_of(document, f"{verb.capitalize()}Result"))
