"""Hostile clients against the live daemon: bad bodies, odd names, slow and
greedy connections. Each gets a JSON error or a closed connection, and none
holds up an ordinary client."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from dataclasses import dataclass, field

import pytest
import requests

from tests.deployd import Deployd
from tests.integration.conftest import WORK

pytestmark = pytest.mark.integration

CAP = 2
# How long an ordinary request may take while a hostile client is at work.
PROMPT = 1.0
# 64 KiB, the largest body the API takes.
MAX_BODY = 64 * 1024

TARGETS = f"""
[targets.quick]
working_directory = "{WORK}"
user = "nobody"
steps = ["echo hi"]

[targets.flood]
working_directory = "{WORK}"
user = "nobody"
steps = ["yes 'a line of build output, over and over' | head -c 50000000; sleep 300"]

[targets.endless]
working_directory = "{WORK}"
user = "nobody"
steps = ["echo running; sleep 300"]

[services.steady]
unit = "hostile-steady.service"
"""

STEADY_UNIT = """\
[Service]
ExecStart=/bin/sh -c 'echo steady up; exec sleep infinity'
"""

# Refused requests count against their address (ten a minute, then 429 for
# everything it sends), so each one comes from a loopback address of its own.
_addresses = (f"127.0.{a}.{b}" for a in range(20, 40) for b in range(1, 255))


def stranger() -> str:
    return next(_addresses)


@dataclass
class Answer:
    """What came back on a raw connection: an HTTP answer, or nothing."""

    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    reset: bool = False

    def json(self) -> dict:
        return json.loads(self.body)


def read_answer(sock: socket.socket) -> Answer:
    """One answer, read until its Content-Length, or until the peer closes."""
    data = b""
    answer = Answer()
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return answer
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        answer.status = int(lines[0].split()[1])
        for line in lines[1:]:
            name, _, value = line.partition(":")
            answer.headers[name.strip().lower()] = value.strip()
        length = int(answer.headers.get("content-length", "0"))
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        answer.body = body
    except ConnectionResetError:
        answer.reset = True
    return answer


def exchange(daemon: Deployd, data: bytes, source: str = "127.0.0.1") -> Answer:
    """Send ``data`` as it is on a fresh connection and read one answer."""
    with socket.create_connection(
        ("127.0.0.1", daemon.port), timeout=10, source_address=(source, 0)
    ) as sock:
        # Refused before it had all of it, the answer may still be there.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)
        return read_answer(sock)


def request(
    daemon: Deployd,
    start: bytes,
    headers: bytes = b"",
    body: bytes = b"",
    secret: bool = True,
) -> Answer:
    """``start`` (method, target, version) with a Host, the secret unless told
    otherwise (then from an address of its own), ``headers`` and ``body``."""
    sent = b"X-Admin-Secret: " + daemon.secret.encode() + b"\r\n" if secret else b""
    data = start + b"\r\nHost: deployd\r\n" + sent + headers + b"\r\n" + body
    return exchange(daemon, data, "127.0.0.1" if secret else stranger())


def post_json(daemon: Deployd, body: bytes, secret: bool = True) -> Answer:
    headers = b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
    return request(daemon, b"POST /api/admin/deploy HTTP/1.1", headers, body, secret)


def assert_error(answer: Answer, status: int, *codes: str) -> None:
    assert answer.status == status, answer
    assert answer.headers["content-type"].startswith("application/json"), answer
    body = answer.json()
    assert body["error"] in codes, body
    assert isinstance(body["message"], str) and body["message"], body


def assert_prompt(daemon: Deployd) -> None:
    """An ordinary client, on a connection of its own, is served at once."""
    started = time.monotonic()
    answer = requests.get(
        daemon.base_url + "/api/admin/deploys",
        headers={"X-Admin-Secret": daemon.secret},
        timeout=5,
    )
    took = time.monotonic() - started

    assert answer.status_code == 200, answer.text
    assert took < PROMPT, f"GET /api/admin/deploys took {took:.2f}s"


@pytest.fixture(scope="module")
def daemon(deployd: Deployd) -> Deployd:
    deployd.sandbox.write("/etc/systemd/system/hostile-steady.service", STEADY_UNIT)
    deployd.sandbox.systemctl("daemon-reload")
    deployd.sandbox.systemctl("restart", "hostile-steady.service")
    deployd.configure(TARGETS, server=f"max_streams = {CAP}\n")
    deployd.restart()
    return deployd


@pytest.fixture(scope="module")
def finished(daemon: Deployd) -> str:
    """The id of a deployment that has ended."""
    deployment_id = daemon.deploy("quick")
    assert daemon.wait(deployment_id)["status"] == "success"
    return deployment_id


@pytest.mark.parametrize(
    "body",
    [b"{", b'{"target": "quick"', b"", b"\xff\xfe{}", b'{"target": "quick"}}', b"NaN"],
)
def test_deploy_malformed_json_is_bad_json(daemon: Deployd, body: bytes) -> None:
    answer = post_json(daemon, body)

    assert_error(answer, 400, "bad_json", "not_an_object")
    assert_prompt(daemon)


def test_deploy_deeply_nested_json_is_refused(daemon: Deployd) -> None:
    unclosed = post_json(daemon, b"[" * 60000)
    balanced = post_json(daemon, b"[" * 30000 + b"]" * 30000)
    in_target = post_json(daemon, b'{"target": ' + b'{"a": ' * 9000)
    oversized = post_json(daemon, b"[" * 100000)

    assert_error(unclosed, 400, "bad_json")
    # Too deep to decode, or decoded and not an object: either way a 400.
    assert_error(balanced, 400, "bad_json", "not_an_object")
    assert_error(in_target, 400, "bad_json")
    assert_error(oversized, 413, "body_too_large")
    assert_prompt(daemon)


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({}, "missing_target"),
        ({"target": None}, "missing_target"),
        ({"target": 1}, "bad_target"),
        ({"target": True}, "bad_target"),
        ({"target": ["quick"]}, "bad_target"),
        ({"target": {"name": "quick"}}, "bad_target"),
        ({"target": "quick", "ref": 5}, "bad_ref"),
        ({"target": "quick", "ref": ["main"]}, "bad_ref"),
        ({"target": "quick", "ref": ""}, "bad_ref"),
        ({"target": "quick", "ref": "main; rm -rf /"}, "bad_ref"),
        ({"target": "quick", "ref": "a\u0000b"}, "bad_ref"),
        ({"target": "quick", "ref": "line\nbreak"}, "bad_ref"),
        ({"target": "quick", "ref": "x" * 201}, "bad_ref"),
        ({"target": "qu\u0000ick"}, "unknown_target"),
        ({"target": "../quick"}, "unknown_target"),
        ({"target": "qu\u00efck \u2603"}, "unknown_target"),
        ({"target": "x" * 60000}, "unknown_target"),
        (["quick"], "not_an_object"),
        ("quick", "not_an_object"),
        (None, "not_an_object"),
    ],
)
def test_deploy_wrong_shapes_are_400_with_their_code(
    daemon: Deployd, body: object, code: str
) -> None:
    before = daemon.get("/api/admin/deploys").json()

    answer = post_json(daemon, json.dumps(body).encode())

    assert_error(answer, 400, code)
    assert daemon.get("/api/admin/deploys").json() == before


def test_deploy_body_of_another_type_is_415(daemon: Deployd) -> None:
    body = b'{"target": "quick"}'
    headers = b"Content-Type: text/plain\r\nContent-Length: %d\r\n" % len(body)

    answer = request(daemon, b"POST /api/admin/deploy HTTP/1.1", headers, body)

    assert_error(answer, 415, "unsupported_media_type")


def test_deploy_body_over_64_kib_is_413(daemon: Deployd) -> None:
    padded = b'{"target": "quick", "pad": "' + b"x" * MAX_BODY + b'"}'
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(padded), padded)
    headers = b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"

    sized = post_json(daemon, padded)
    streamed = request(daemon, b"POST /api/admin/deploy HTTP/1.1", headers, chunked)

    assert_error(sized, 413, "body_too_large")
    assert_error(streamed, 413, "body_too_large")
    assert_prompt(daemon)


def test_deploy_huge_content_length_is_413(daemon: Deployd) -> None:
    headers = b"Content-Type: application/json\r\nContent-Length: 99999999999999\r\n"

    answer = request(daemon, b"POST /api/admin/deploy HTTP/1.1", headers, b"{}")

    assert_error(answer, 413, "body_too_large")
    assert_prompt(daemon)


@pytest.mark.parametrize(
    "headers",
    [b"X-Big: " + b"a" * 300_000 + b"\r\n", b"X-Many: abcdefgh\r\n" * 20_000],
    ids=["one-huge-header", "many-headers"],
)
def test_request_huge_headers_are_431_or_closed(
    daemon: Deployd, headers: bytes
) -> None:
    answer = request(daemon, b"GET /api/admin/deploys HTTP/1.1", headers)

    if answer.status is not None:
        assert_error(answer, 431, "headers_too_large")
    assert_prompt(daemon)


def test_request_huge_url_is_refused(daemon: Deployd) -> None:
    huge = request(daemon, b"GET /api/admin/" + b"a" * 300_000 + b" HTTP/1.1")
    long = request(daemon, b"GET /api/admin/" + b"a" * 100_000 + b" HTTP/1.1")

    if huge.status is not None:
        assert_error(huge, 431, "headers_too_large", "uri_too_long")
    assert_error(long, 404, "not_found")
    assert_prompt(daemon)


@pytest.mark.parametrize(
    "start",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        b"GET /api/admin/deploys HTTP/1.1\r\nX-Nul: a\x00b",
        b"GET /api/admin/services/\xc3\xa4r\xc3\xa8s HTTP/1.1",
    ],
    ids=["tls-hello", "nul-in-header", "raw-utf8-path"],
)
def test_request_garbled_head_is_a_json_400(daemon: Deployd, start: bytes) -> None:
    answer = request(daemon, start)

    if answer.status is not None:
        assert_error(answer, 400, "bad_request", "not_found")
    assert_prompt(daemon)


ODD_NAMES = [
    "a%00b",
    "a\x00b",
    "..%2F..%2Fetc%2Fpasswd",
    "..",
    "%2e%2e",
    "%C3%A4r%C3%A8s",
    "%E2%98%83",
    "%FF%FE",
    "00000000-0000-0000-0000-00000000000%00",
    "%0d%0aX-Injected:%20yes",
]


@pytest.mark.parametrize("name", ODD_NAMES)
@pytest.mark.parametrize(
    "template",
    [
        "GET /api/admin/deploy/{}",
        "GET /api/admin/deploy/{}/log",
        "GET /api/admin/deploy/{}/events",
        "POST /api/admin/deploy/{}/cancel",
        "GET /api/admin/services/{}",
        "GET /api/admin/services/{}/logs",
        "GET /api/admin/services/{}/logs?follow=1",
        "POST /api/admin/services/{}/restart",
    ],
)
def test_paths_odd_names_are_404(daemon: Deployd, template: str, name: str) -> None:
    start = template.format(name).encode("latin-1") + b" HTTP/1.1"

    answer = request(daemon, start, b"Content-Length: 0\r\n")

    assert_error(answer, 404, "not_found")
    assert "x-injected" not in answer.headers


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ("limit=%00", "bad_limit"),
        ("limit=%D9%A3", "bad_limit"),
        ("limit=99999999999999999999999", "bad_limit"),
        ("status=..%2F", "bad_status"),
        ("before=..%2F..%2Fetc", "bad_before"),
        ("before=%00", "bad_before"),
    ],
)
def test_deploys_odd_filters_are_400(daemon: Deployd, query: str, code: str) -> None:
    answer = request(daemon, f"GET /api/admin/deploys?{query} HTTP/1.1".encode())

    assert_error(answer, 400, code)


@pytest.mark.parametrize("value", ["..%2F..%2Fetc", "%00", "%E2%98%83"])
def test_deploys_odd_target_filter_finds_nothing(daemon: Deployd, value: str) -> None:
    answer = request(daemon, f"GET /api/admin/deploys?target={value} HTTP/1.1".encode())

    assert answer.status == 200
    assert answer.json() == {"deploys": []}


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ("lines=%00", "bad_lines"),
        ("lines=-1", "bad_lines"),
        ("after=..%2F..%2Fetc", "bad_after"),
        ("after=%00", "bad_after"),
        ("since=%00", "bad_since"),
        ("follow=%00", "bad_follow"),
    ],
)
def test_logs_odd_parameters_are_400(daemon: Deployd, query: str, code: str) -> None:
    start = f"GET /api/admin/services/steady/logs?{query} HTTP/1.1".encode()

    answer = request(daemon, start)

    assert_error(answer, 400, code)


@pytest.mark.parametrize("value", [b"../1", b"-1", b"1e9", b"\xe2\x98\x83", b"9" * 40])
def test_events_odd_last_event_id_is_400(
    daemon: Deployd, finished: str, value: bytes
) -> None:
    start = f"GET /api/admin/deploy/{finished}/events HTTP/1.1".encode()

    answer = request(daemon, start, b"Last-Event-ID: " + value + b"\r\n")

    assert_error(answer, 400, "bad_last_event_id")


def test_log_odd_offset_is_400(daemon: Deployd, finished: str) -> None:
    start = f"GET /api/admin/deploy/{finished}/log?offset=%00 HTTP/1.1".encode()

    answer = request(daemon, start)

    assert_error(answer, 400, "bad_offset")


@pytest.mark.parametrize(
    "order",
    [("right", "wrong"), ("wrong", "right"), ("right", "right")],
)
def test_auth_repeated_secret_headers_are_refused(
    daemon: Deployd, order: tuple[str, str]
) -> None:
    values = {"right": daemon.secret, "wrong": "not-the-secret"}
    headers = b"".join(
        b"X-Admin-Secret: " + values[which].encode() + b"\r\n" for which in order
    )

    answer = request(daemon, b"GET /api/admin/deploys HTTP/1.1", headers, secret=False)

    # Two values arrive joined as one, which matches no secret: refused,
    # whichever comes first, rather than one of them picked.
    assert_error(answer, 401, "unauthorized")


def test_auth_secret_under_a_lookalike_name_is_refused(daemon: Deployd) -> None:
    right = daemon.secret.encode()
    alone = b"X_Admin_Secret: " + right + b"\r\n"
    beside = b"X-Admin-Secret: wrong\r\n" + alone

    answers = [
        request(daemon, b"GET /api/admin/deploys HTTP/1.1", headers, secret=False)
        for headers in (alone, beside)
    ]

    for answer in answers:
        assert_error(answer, 401, "unauthorized")


@pytest.mark.parametrize(
    ("start", "headers", "body"),
    [
        (b"GET /api/admin/nowhere HTTP/1.1", b"", b""),
        (b"GET /elsewhere HTTP/1.1", b"", b""),
        (b"DELETE /api/admin/deploys HTTP/1.1", b"", b""),
        (b"GET /api/admin/deploy/not-an-id HTTP/1.1", b"", b""),
        (b"GET /api/admin/deploy/a%00b/events HTTP/1.1", b"", b""),
        (b"GET /api/admin/services/nope/logs?follow=1 HTTP/1.1", b"", b""),
        (b"GET /api/admin/services/steady/logs?follow=1 HTTP/1.1", b"", b""),
        (b"GET /api/admin/services/steady/logs?lines=0 HTTP/1.1", b"", b""),
        (b"GET /api/admin/deploys?limit=0 HTTP/1.1", b"", b""),
        (
            b"POST /api/admin/deploy HTTP/1.1",
            b"Content-Type: application/json\r\nContent-Length: 1\r\n",
            b"{",
        ),
        (
            b"POST /api/admin/deploy HTTP/1.1",
            b"Content-Type: text/plain\r\nContent-Length: 2\r\n",
            b"{}",
        ),
        (
            b"POST /api/admin/deploy HTTP/1.1",
            b"Content-Type: application/json\r\nContent-Length: 70000\r\n",
            b" " * 70000,
        ),
    ],
)
def test_auth_every_error_path_needs_the_secret(
    daemon: Deployd, start: bytes, headers: bytes, body: bytes
) -> None:
    answer = request(daemon, start, headers, body, secret=False)

    assert_error(answer, 401, "unauthorized")


def test_auth_stream_of_a_real_deployment_needs_the_secret(
    daemon: Deployd, finished: str
) -> None:
    start = f"GET /api/admin/deploy/{finished}/events HTTP/1.1".encode()

    answer = request(daemon, start, secret=False)

    assert_error(answer, 401, "unauthorized")


def test_slowloris_one_byte_a_second_does_not_hold_up_others(
    daemon: Deployd,
) -> None:
    data = (
        f"GET /api/admin/deploys HTTP/1.1\r\nHost: deployd\r\n"
        f"X-Admin-Secret: {daemon.secret}\r\n\r\n"
    ).encode()
    slow = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)

    with slow:
        for byte in data[:5]:
            slow.send(bytes([byte]))
            assert_prompt(daemon)
            time.sleep(1)
        slow.sendall(data[5:])
        answer = read_answer(slow)

    assert answer.status == 200
    assert answer.json() == daemon.get("/api/admin/deploys").json()


def test_idle_connections_do_not_lock_out_clients(daemon: Deployd) -> None:
    idle = [
        socket.create_connection(
            ("127.0.0.1", daemon.port), timeout=10, source_address=(stranger(), 0)
        )
        for _ in range(150)
    ]

    try:
        time.sleep(0.5)
        assert_prompt(daemon)
    finally:
        for sock in idle:
            sock.close()


def open_events(daemon: Deployd, deployment_id: str) -> socket.socket:
    """An event stream on a raw connection whose receive buffer is small."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", daemon.port))
    sock.sendall(
        f"GET /api/admin/deploy/{deployment_id}/events HTTP/1.1\r\nHost: deployd\r\n"
        f"X-Admin-Secret: {daemon.secret}\r\n\r\n".encode()
    )
    return sock


def status_line(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data.strip()


def threads_of(daemon: Deployd) -> int:
    status = daemon.sandbox.path(f"/proc/{daemon.main_pid()}/status").read_text()
    return int(status.split("Threads:")[1].split()[0])


def test_events_unread_stream_holds_no_one_up_and_frees_its_place(
    daemon: Deployd,
) -> None:
    threads = threads_of(daemon)
    flood = daemon.deploy("flood")
    endless = daemon.deploy("endless")
    deadline = time.monotonic() + 30
    while daemon.get(f"/api/admin/deploy/{flood}/log?offset=49999999").text == "":
        assert time.monotonic() < deadline, "the flood build wrote less than 50 MB"
        time.sleep(0.2)

    try:
        unread = open_events(daemon, flood)
        # Long enough for the daemon to fill every buffer on the way.
        time.sleep(2)
        assert_prompt(daemon)
        assert daemon.get(f"/api/admin/deploy/{flood}").status_code == 200
        reading = open_events(daemon, endless)
        assert status_line(reading).startswith(b"HTTP/1.1 200")
        over = open_events(daemon, endless)
        refused = read_answer(over)
        over.close()

        unread.close()
        deadline = time.monotonic() + 5
        while True:
            again = open_events(daemon, endless)
            opened = status_line(again)
            again.close()
            if opened.startswith(b"HTTP/1.1 200") or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        reading.close()
    finally:
        for deployment_id in (flood, endless):
            daemon.post(f"/api/admin/deploy/{deployment_id}/cancel")

    assert_error(refused, 503, "too_many_streams")
    assert refused.headers["retry-after"].isdigit()
    assert opened.startswith(b"HTTP/1.1 200"), opened
    deadline = time.monotonic() + 5
    while threads_of(daemon) > threads and time.monotonic() < deadline:
        time.sleep(0.1)
    assert threads_of(daemon) <= threads
    assert_prompt(daemon)
