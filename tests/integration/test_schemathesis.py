"""The live daemon against its OpenAPI document, with cases schemathesis makes.

Every operation is sent generated requests, with the secret and without it, and
chains of them that follow the document's links; each answer must be no server
error and must match the document: status, content type, headers and body
schema, and a request the document rules out must be refused. The event streams
are left out of the generated runs, since a followed journal never ends, and
are checked once by hand. Run with -s for a tally of the answers."""

from __future__ import annotations

import collections
import json
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import hypothesis
import jsonschema
import pytest
import requests
import schemathesis
from requests.adapters import HTTPAdapter
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from ares_deployd.api.openapi import DOCUMENT
from tests.deployd import ROOT, Deployd, free_port
from tests.integration.conftest import WORK

pytestmark = pytest.mark.integration

WEB_PORT = free_port()
BUILD_SECONDS = 8
# The document's examples name "ares", as target and as service: configured
# here under that name, the examples reach real deployments and real jobs.
CONFIG = f"""
# Its build outlasts any chain of linked calls, so that whether a cancel or a
# second deployment is accepted never depends on how fast the build was.
[targets.ares]
working_directory = "{WORK}"
user = "nobody"
steps = ["echo hi", "sleep {BUILD_SECONDS}", "echo there"]
# A revision before each deployment makes every one of them a rollback point.
revision = "echo v1"

[targets.other]
working_directory = "{WORK}"
user = "nobody"
steps = ["echo other"]

# Ignores SIGTERM, so that stopping it takes until it ends by itself.
[targets.stubborn]
working_directory = "{WORK}"
user = "nobody"
steps = ["trap '' TERM; sleep 25"]

[services.ares]
unit = "st-ares.service"
health_url = "http://127.0.0.1:{WEB_PORT}/health"

[services.idle]
unit = "st-idle.service"

[services.ghost]
unit = "st-ghost.service"
"""
# Generated requests start and stop them many times in a row: no start limit.
UNIT = "[Unit]\nStartLimitIntervalSec=0\n[Service]\nExecStart={}\n"
UNITS = {
    "st-ares.service": UNIT.format(
        f"/usr/bin/python3 {ROOT}/examples/demo/server.py {WEB_PORT} st-ares"
    ),
    "st-idle.service": UNIT.format("/bin/sleep infinity"),
}
DOC = json.loads(DOCUMENT.read_text(encoding="utf-8"))
STREAMS = "streamDeploymentEvents"
FOLLOWING = ("1", "true", "yes", "on")
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
# Long enough for a service job; a stream let through by mistake ends by it.
TIMEOUT = 30
SETTINGS = hypothesis.settings(
    deadline=timedelta(seconds=TIMEOUT + 5),
    database=None,
    suppress_health_check=list(hypothesis.HealthCheck),
)


def load(security_parameters: bool, examples: int) -> schemathesis.BaseSchema:
    config = schemathesis.Config.from_dict(
        {
            "cache": {"enabled": False},
            "generation": {
                "max-examples": examples,
                "with-security-parameters": security_parameters,
            },
            "seed": 20260313,
        }
    )
    schema = schemathesis.openapi.from_path(str(DOCUMENT), config=config)
    return schema.exclude(operation_id=STREAMS)


def _following(query: dict[str, Any] | None) -> bool:
    value = (query or {}).get("follow")
    return str(value).strip().lower() in FOLLOWING if value is not None else False


authenticated = load(security_parameters=False, examples=50)
unauthenticated = load(security_parameters=True, examples=8)
# Answers by operation and status, summed up when the module ends.
answers: collections.Counter[tuple[str, int]] = collections.Counter()


class FromAddress(HTTPAdapter):
    """Connects from one loopback address: failed secrets count per address, and
    each operation's refusals must not lock out the others."""

    def __init__(self, address: str) -> None:
        self.address = address
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["source_address"] = (self.address, 0)
        super().init_poolmanager(*args, **kwargs)


_sessions: dict[str, requests.Session] = {}


def session_for(label: str) -> requests.Session:
    """A session of its own per operation, from 127.0.0.2 on."""
    if label not in _sessions:
        session = requests.Session()
        session.mount("http://", FromAddress(f"127.0.0.{len(_sessions) + 2}"))
        _sessions[label] = session
    return _sessions[label]


@pytest.fixture(scope="module")
def daemon(deployd: Deployd) -> Iterator[Deployd]:
    sandbox = deployd.sandbox
    for unit, text in UNITS.items():
        sandbox.write(f"/etc/systemd/system/{unit}", text)
    sandbox.systemctl("daemon-reload")
    sandbox.systemctl("start", *UNITS)
    deployd.configure(CONFIG)
    deployd.restart()
    yield deployd
    sandbox.systemctl("stop", *UNITS, check=False)
    labels = {label.removesuffix(" (linked)") for label, _ in answers}
    print(f"\nschemathesis: {answers.total()} requests to {len(labels)} operations")
    for (label, status), count in sorted(answers.items()):
        print(f"  {count:5d}  {status}  {label}")


def call(
    case: schemathesis.Case, daemon: Deployd, **kwargs: Any
) -> requests.Response | None:
    """Send ``case`` and check the answer against the document; None when the
    case asks for an event stream, which never ends, and is not sent."""
    # Filter hooks do not reach the cases of every phase, so this is done here.
    if _following(case.query):
        return None

    answer = case.call(base_url=daemon.base_url, timeout=TIMEOUT, **kwargs)

    answers[case.operation.label, answer.status_code] += 1
    case.validate_response(
        answer,
        checks=CHECKS,
        transport_kwargs={"base_url": daemon.base_url, **kwargs},
    )
    return answer


@authenticated.parametrize()
@SETTINGS
def test_schemathesis_with_secret_answers_as_documented(
    case: schemathesis.Case, daemon: Deployd
) -> None:
    call(case, daemon, headers={"X-Admin-Secret": daemon.secret})


@unauthenticated.parametrize()
@SETTINGS
def test_schemathesis_without_secret_is_refused_as_documented(
    case: schemathesis.Case, daemon: Deployd
) -> None:
    answer = call(case, daemon, session=session_for(case.operation.label))

    assert answer is None or answer.status_code in (401, 429), answer.text


def events(text: str) -> list[dict[str, str]]:
    """Server-sent events as field dictionaries; comments dropped."""
    found = []
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if line.startswith(":") or ":" not in line:
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            fields[name] = f"{fields[name]}\n{value}" if name in fields else value
        if fields:
            found.append(fields)
    return found


def test_openapi_deployment_events_stream_as_documented(daemon: Deployd) -> None:
    deployment = daemon.wait(daemon.deploy("other"))

    answer = daemon.get(f"/api/admin/deploy/{deployment['id']}/events", timeout=20)

    documented = DOC["paths"]["/api/admin/deploy/{id}/events"]["get"]["responses"]
    assert "200" in documented
    assert answer.status_code == 200
    assert answer.headers["Content-Type"].startswith("text/event-stream")
    assert "text/event-stream" in documented["200"]["content"]
    for name, header in documented["200"]["headers"].items():
        assert answer.headers[name] == header["schema"]["const"]
    sent = events(answer.text)
    assert [event["event"] for event in sent][-1] == "status"
    assert {event["event"] for event in sent[:-1]} == {"output"}
    assert any(event["data"] == "other" for event in sent)
    status = json.loads(sent[-1]["data"])
    jsonschema.Draft202012Validator(
        {"$ref": "#/components/schemas/Deployment", "components": DOC["components"]}
    ).validate(status)
    assert status["status"] == "success"


def test_openapi_followed_logs_stream_as_documented(daemon: Deployd) -> None:
    url = f"{daemon.base_url}/api/admin/services/ares/logs"

    with daemon.http.get(
        url, params={"follow": "1", "lines": "1"}, stream=True, timeout=20
    ) as answer:
        first = next(answer.iter_lines(decode_unicode=True))

    documented = DOC["paths"]["/api/admin/services/{name}/logs"]["get"]["responses"]
    assert answer.status_code == 200
    assert answer.headers["Content-Type"].startswith("text/event-stream")
    assert "text/event-stream" in documented["200"]["content"]
    for name, header in documented["200"]["headers"].items():
        assert answer.headers[name] == header["schema"]["const"]
    assert first.startswith("id: s=")


def settle(daemon: Deployd) -> None:
    """Every deployment ended and every service up: the state each chain of
    linked calls starts from, so that the same calls get the same answers."""
    running = daemon.get("/api/admin/deploys", params={"status": "running"})
    for deployment in running.json()["deploys"]:
        daemon.post(f"/api/admin/deploy/{deployment['id']}/cancel", timeout=60)
        daemon.wait(deployment["id"])
    daemon.sandbox.systemctl("start", *UNITS)


def test_schemathesis_linked_calls_answer_as_documented(daemon: Deployd) -> None:
    settle(daemon)

    class Linked(authenticated.as_state_machine()):  # type: ignore[misc]
        def teardown(self) -> None:
            settle(daemon)

        def get_call_kwargs(self, case: schemathesis.Case) -> dict[str, Any]:
            return {
                "base_url": daemon.base_url,
                "headers": {"X-Admin-Secret": daemon.secret},
                "timeout": TIMEOUT,
            }

        def validate_response(
            self, response: Any, case: schemathesis.Case, **kwargs: Any
        ) -> None:
            answers[f"{case.operation.label} (linked)", response.status_code] += 1
            kwargs.pop("additional_checks", None)
            case.validate_response(response, checks=CHECKS, transport_kwargs=kwargs)

    Linked.run(
        settings=hypothesis.settings(SETTINGS, max_examples=20, stateful_step_count=6)
    )


def test_logs_unseekable_cursor_is_400(daemon: Deployd) -> None:
    answer = daemon.get("/api/admin/services/idle/logs", params={"after": "a=0"})

    assert answer.status_code == 400, answer.text
    assert answer.json()["error"] == "bad_after"


def test_cancel_of_a_build_slow_to_stop_is_not_a_server_error(
    daemon: Deployd,
) -> None:
    deployment_id = daemon.deploy("stubborn")
    time.sleep(0.5)

    try:
        answer = daemon.post(f"/api/admin/deploy/{deployment_id}/cancel", timeout=60)
    finally:
        ended = daemon.wait(deployment_id, timeout=60)

    documented = DOC["paths"]["/api/admin/deploy/{id}/cancel"]["post"]["responses"]
    assert ended["status"] == "cancelled"
    assert str(answer.status_code) in documented, answer.text
