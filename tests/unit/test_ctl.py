"""The command-line client: event parsing, tables, colour, exit codes, arguments,
where it connects, and resuming streams against a small real HTTP server."""

from __future__ import annotations

import json
import re
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ares_deployd import client, ctl
from ares_deployd.client import Client, Event, EventParser
from ares_deployd.errors import DeploydError

ANSI = re.compile(r"\033\[[0-9;]*m")


def parse(text: str) -> list[Event]:
    parser = EventParser()
    events = []
    for line in text.split("\n"):
        event = parser.feed(line)
        if event is not None:
            events.append(event)
    return events


# Server-sent events.


def test_event_parser_joins_data_lines_with_newlines() -> None:
    events = parse("id: 7\nevent: output\ndata: 50%\ndata: 100%\n\n")

    assert events == [Event("output", "50%\n100%", "7")]


def test_event_parser_ignores_comments_and_blank_runs() -> None:
    events = parse(": keep-alive\n\n: keep-alive\n\n\nevent: output\ndata: x\n\n")

    assert events == [Event("output", "x", "")]


def test_event_parser_keeps_the_last_id_for_events_without_one() -> None:
    text = (
        "id: 0\nevent: output\ndata: first\n\n"
        "id: 6\nevent: output\ndata: second\n\n"
        'event: status\ndata: {"status": "success"}\n\n'
    )

    events = parse(text)

    assert [event.id for event in events] == ["0", "6", "6"]
    assert events[2].type == "status"
    assert json.loads(events[2].data) == {"status": "success"}


def test_event_parser_reads_fields_as_the_standard_says() -> None:
    text = (
        "data:no space\n\n"
        "data:  two spaces\n\n"
        "data\n\n"
        "id: bad\0id\ndata: kept\n\n"
        "retry: 2500\nunknown: field\ndata: last\n\n"
    )
    parser = EventParser()

    events = [e for line in text.split("\n") if (e := parser.feed(line)) is not None]

    assert [event.data for event in events] == [
        "no space",
        " two spaces",
        "",
        "kept",
        "last",
    ]
    assert {event.type for event in events} == {"message"}
    assert {event.id for event in events} == {""}
    assert parser.retry == 2.5


def test_event_parser_without_blank_line_dispatches_nothing() -> None:
    assert parse("event: output\ndata: unfinished") == []


# Tables and colour.


def test_format_table_aligns_columns_without_trailing_blanks() -> None:
    lines = ctl.format_table(
        ["ID", "STATUS", "REASON"],
        [["a", "success", "-"], ["bbbbbb", "failed", "step 2 exited"]],
    )

    assert lines == [
        "ID      STATUS   REASON",
        "a       success  -",
        "bbbbbb  failed   step 2 exited",
    ]


def test_format_table_colour_does_not_shift_columns() -> None:
    rows = [["one", "success", "x"], ["two", "failed", "y"]]

    plain = ctl.format_table(["N", "STATUS", "Z"], rows)
    coloured = ctl.format_table(
        ["N", "STATUS", "Z"],
        rows,
        lambda column, text: ctl.DEPLOY_COLOURS.get(text) if column == 1 else None,
        enabled=True,
    )

    assert coloured != plain
    assert "\033[32msuccess\033[0m" in coloured[1]
    assert [ANSI.sub("", line) for line in coloured] == plain
    assert "\033" not in coloured[0]


def test_format_fields_aligns_values() -> None:
    lines = ctl.format_fields([("id", "x"), ("revision_before", "abc"), ("reason", "")])

    assert lines == ["id               x", "revision_before  abc", "reason"]


def test_shown_marks_missing_values() -> None:
    assert [ctl.shown(v) for v in (None, "", 0, "a")] == ["-", "-", "0", "a"]
    assert ctl.short_revision("0123456789abcdef0123") == "0123456789ab"
    assert ctl.short_revision(None) == "-"


class Stream:
    def __init__(self, tty: bool) -> None:
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize(
    ("tty", "environ", "expected"),
    [
        (True, {}, True),
        (True, {"NO_COLOR": ""}, True),
        (True, {"NO_COLOR": "1"}, False),
        (True, {"NO_COLOR": "0"}, False),
        (False, {}, False),
    ],
)
def test_colour_enabled_only_on_a_terminal_without_no_color(
    tty: bool, environ: dict[str, str], expected: bool
) -> None:
    assert ctl.colour_enabled(Stream(tty), environ) is expected


def test_paint_leaves_text_alone_when_disabled() -> None:
    assert ctl.paint("failed", "31", False) == "failed"
    assert ctl.paint("failed", None, True) == "failed"
    assert ctl.paint("failed", "31", True) == "\033[31mfailed\033[0m"


def test_status_line_rewrites_in_place_only_when_enabled(tmp_path: Path) -> None:
    with open(tmp_path / "on", "w") as on, open(tmp_path / "off", "w") as off:
        shown, hidden = ctl.StatusLine(on, True), ctl.StatusLine(off, False)
        for line in (shown, hidden):
            line.show("ares: running 1s")
            line.show("ares: running 2s")
            line.clear()
            line.clear()

    assert (tmp_path / "on").read_bytes() == (
        b"\r\033[Kares: running 1s\r\033[Kares: running 2s\r\033[K"
    )
    assert (tmp_path / "off").read_bytes() == b""


def test_elapsed_since_counts_from_the_start_stamp() -> None:
    start = 1773410400.0  # 2026-03-13T14:00:00Z

    assert ctl.elapsed_since("2026-03-13T14:00:00Z", start + 72) == "1m12s"
    assert ctl.elapsed_since("2026-03-13T14:00:00Z", start - 5) == "0s"
    assert ctl.elapsed_since(None, start) == "0s"
    assert ctl.elapsed_since("yesterday", start) == "0s"


# Exit codes and arguments.


@pytest.mark.parametrize(
    ("status", "code"), [("success", 0), ("failed", 1), ("cancelled", 1)]
)
def test_result_code_of_each_final_status(status: str, code: int) -> None:
    assert ctl.result_code(status) == code


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["bogus"],
        ["deploy"],
        ["status"],
        ["list", "--limit", "0"],
        ["list", "--limit", "x"],
        ["list", "--status", "done"],
        ["logs", "web", "-n", "-3"],
        ["deploy", "ares", "--frobnicate"],
    ],
)
def test_main_usage_error_exits_2_with_one_error_line(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code = ctl.main(argv)

    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert captured.err.startswith("Error: ")


def test_main_help_lists_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    code = ctl.main(["--help"])

    out = capsys.readouterr().out
    assert code == 0
    for command in ("deploy", "status", "output", "list", "cancel", "services"):
        assert command in out
    for line in ("0    success", "1    the deployment failed", "2    a usage error"):
        assert line in out
    assert "3    the API could not be reached" in out


def test_options_are_taken_before_and_after_the_command() -> None:
    parser = ctl.build_parser()

    before = parser.parse_args(["--json", "--url", "http://a:1", "list"])
    after = parser.parse_args(["list", "--json", "--url", "http://a:1"])
    neither = parser.parse_args(["list"])

    assert (before.json, before.url) == (True, "http://a:1")
    assert (after.json, after.url) == (True, "http://a:1")
    assert (neither.json, neither.url) == (False, None)


# Where it connects.


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in (client.URL_ENV, client.SECRET_ENV, "ARES_DEPLOYD_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    return monkeypatch


def write_config(tmp_path: Path, listen: str, secret: str | None) -> str:
    secret_file = tmp_path / "admin-secret"
    if secret is not None:
        secret_file.write_text(secret + "\n")
    path = tmp_path / "config.toml"
    path.write_text(
        f'[server]\nlisten = "{listen}"\nadmin_secret_file = "{secret_file}"\n'
    )
    return str(path)


def test_resolve_connection_reads_the_daemon_configuration(
    tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    path = write_config(tmp_path, "0.0.0.0:4711", "s3cret")

    assert client.resolve_connection(None, None, path) == (
        "http://127.0.0.1:4711",
        "s3cret",
    )


def test_resolve_connection_options_and_environment_win(
    tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    path = write_config(tmp_path, "[::]:4711", "from-config")
    given = tmp_path / "given"
    given.write_text("from-file\n")

    clean_env.setenv(client.SECRET_ENV, "from-env")
    from_env = client.resolve_connection(None, None, path)
    from_file = client.resolve_connection("http://h:1", str(given), path)

    assert from_env == ("http://[::1]:4711", "from-env")
    assert from_file == ("http://h:1", "from-file")


def test_resolve_connection_without_config_uses_the_default_url(
    tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    clean_env.setenv(client.SECRET_ENV, "s")

    found = client.resolve_connection(None, None, str(tmp_path / "missing.toml"))

    assert found == ("http://127.0.0.1:3001", "s")


def test_resolve_connection_without_secret_says_how_to_give_one(
    tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    path = write_config(tmp_path, "127.0.0.1:4711", None)

    with pytest.raises(DeploydError) as caught:
        client.resolve_connection(None, None, path)

    message = caught.value.message
    assert "--secret-file" in message and client.SECRET_ENV in message
    assert "no admin secret file" in message
    assert "\n" not in message


def test_main_without_secret_exits_3(
    tmp_path: Path, clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code = ctl.main(["--config", str(tmp_path / "none.toml"), "list"])

    err = capsys.readouterr().err
    assert code == 3
    assert err.startswith("Error: no admin secret: give --secret-file PATH")
    assert err.count("\n") == 1


# Against a small HTTP server.


Handler = Callable[[BaseHTTPRequestHandler], None]


class Peer:
    """An HTTP server on loopback answering each request with the next handler."""

    def __init__(self, handlers: list[Handler]) -> None:
        self.handlers = handlers
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        peer = self

        class Answer(BaseHTTPRequestHandler):
            def do_any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                peer.requests.append(
                    (self.command, self.path, dict(self.headers.items()), body)
                )
                peer.handlers.pop(0)(self)

            do_GET = do_POST = do_any

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Answer)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def peer() -> Iterator[Callable[[list[Handler]], Peer]]:
    started: list[Peer] = []

    def start(handlers: list[Handler]) -> Peer:
        started.append(Peer(handlers))
        return started[-1]

    yield start
    for one in started:
        one.close()


def answer_json(status: int, body: object, headers: dict[str, str] | None = None):
    def handle(request: BaseHTTPRequestHandler) -> None:
        raw = json.dumps(body).encode()
        request.send_response(status)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(raw)))
        for name, value in (headers or {}).items():
            request.send_header(name, value)
        request.end_headers()
        request.wfile.write(raw)

    return handle


def answer_stream(text: str):
    def handle(request: BaseHTTPRequestHandler) -> None:
        request.send_response(200)
        request.send_header("Content-Type", "text/event-stream")
        request.send_header("Connection", "close")
        request.end_headers()
        request.wfile.write(text.encode())
        request.close_connection = True

    return handle


def output(offset: int, line: str) -> str:
    return f"id: {offset}\r\nevent: output\r\ndata: {line}\r\n\r\n"


FINAL = {"id": "d1", "target": "app", "status": "failed", "reason": "step 1"}


def test_client_events_resume_after_the_last_id(peer) -> None:
    server = peer(
        [
            answer_stream(": keep-alive\n\n" + output(0, "one") + output(4, "two")),
            answer_json(503, {"error": "too_many_streams"}, {"Retry-After": "0"}),
            answer_stream(
                output(8, "three")
                + f"event: status\ndata: {json.dumps(FINAL)}\n\n"
                + output(99, "never read")
            ),
        ]
    )
    api = Client(server.url, "s")

    events = list(api.events("/api/admin/deploy/d1/events", final="status"))

    assert [(e.type, e.data) for e in events] == [
        ("output", "one"),
        ("output", "two"),
        ("output", "three"),
        ("status", json.dumps(FINAL)),
    ]
    sent = [headers.get("Last-Event-ID") for _, _, headers, _ in server.requests]
    assert sent == [None, "4", "4"]
    assert all(h["X-Admin-Secret"] == "s" for _, _, h, _ in server.requests)


def test_client_events_refused_stream_is_an_error(peer) -> None:
    server = peer([answer_json(404, {"error": "not_found", "message": "No such"})])

    with pytest.raises(DeploydError) as caught:
        list(Client(server.url, "s").events("/x", final="status"))

    assert (caught.value.status, caught.value.code) == (404, "not_found")
    assert caught.value.message == "No such"


def test_main_logs_follow_ends_on_an_error_event(
    peer, clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    failure = {"error": "journal_failed", "message": "journalctl: no journal"}
    server = peer(
        [
            answer_stream(
                "id: c1\nevent: line\ndata: Mar 13 one\n\n"
                f"event: error\ndata: {json.dumps(failure)}\n\n"
            )
        ]
    )
    clean_env.setenv(client.SECRET_ENV, "s")

    code = ctl.main(["--url", server.url, "logs", "web", "-f", "-n", "5"])

    captured = capsys.readouterr()
    assert code == 3
    assert captured.out == "Mar 13 one\n"
    assert captured.err == "Error: journalctl: no journal\n"
    assert server.requests[0][1] == "/api/admin/services/web/logs?lines=5&follow=1"


def test_main_deploy_follows_and_exits_with_the_result(
    peer, clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    started = {"id": "d1", "status": "running", "target": "app", "message": "go"}
    server = peer(
        [
            answer_json(202, started),
            answer_stream(
                output(0, "building")
                + output(9, "dying")
                + f"event: status\ndata: {json.dumps(FINAL)}\n\n"
            ),
        ]
    )
    clean_env.setenv(client.SECRET_ENV, "s")

    code = ctl.main(["--url", server.url, "deploy", "app", "--ref", "v1"])

    captured = capsys.readouterr()
    assert code == 1
    assert captured.out == "building\ndying\n"
    method, path, headers, body = server.requests[0]
    assert (method, path) == ("POST", "/api/admin/deploy")
    assert headers["Content-Type"] == "application/json"
    assert json.loads(body) == {"target": "app", "ref": "v1"}
    assert server.requests[1][1] == "/api/admin/deploy/d1/events"


def test_main_deploy_json_prints_the_final_deployment(
    peer, clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    started = {"id": "d1", "status": "running", "target": "app", "message": "go"}
    done = {**FINAL, "status": "success", "reason": None}
    server = peer(
        [
            answer_json(202, started),
            answer_stream(
                output(0, "x") + f"event: status\ndata: {json.dumps(done)}\n\n"
            ),
        ]
    )
    clean_env.setenv(client.SECRET_ENV, "s")

    code = ctl.main(["deploy", "app", "--json", "--url", server.url])

    assert code == 0
    assert json.loads(capsys.readouterr().out) == done


def test_main_api_error_is_one_line_with_its_message(
    peer, clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    server = peer(
        [
            answer_json(
                401,
                {"error": "unauthorized", "message": "A valid header\nis required"},
            )
        ]
    )
    clean_env.setenv(client.SECRET_ENV, "wrong")

    code = ctl.main(["--url", server.url, "services"])

    captured = capsys.readouterr()
    assert code == 3
    assert captured.out == ""
    assert captured.err == "Error: A valid header; is required\n"


def test_main_error_without_json_names_the_status(
    peer, clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def gateway(request: BaseHTTPRequestHandler) -> None:
        request.send_error(502, "Bad Gateway")

    server = peer([gateway])
    clean_env.setenv(client.SECRET_ENV, "s")

    code = ctl.main(["--url", server.url, "status", "d1"])

    assert code == 3
    assert capsys.readouterr().err == f"Error: {server.url} answered 502 Bad Gateway\n"


def test_main_unreachable_api_says_where_it_tried(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    clean_env.setenv(client.SECRET_ENV, "s")

    code = ctl.main(["--url", f"http://127.0.0.1:{port}", "list"])

    err = capsys.readouterr().err
    assert code == 3
    assert (
        err == f"Error: cannot connect to http://127.0.0.1:{port}: Connection refused\n"
    )


def test_main_bad_url_is_an_error(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_env.setenv(client.SECRET_ENV, "s")

    code = ctl.main(["--url", "ftp://host", "list"])

    assert code == 3
    assert capsys.readouterr().err.startswith("Error: 'ftp://host' is not an http")


def test_main_list_sends_filters_and_shows_revisions(
    peer, clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    row = {
        **FINAL,
        "started_at": "2026-03-13T14:00:00Z",
        "finished_at": None,
        "revision_before": "a" * 40,
        "revision": None,
    }
    server = peer([answer_json(200, {"deploys": [row]})])
    clean_env.setenv(client.SECRET_ENV, "s")

    code = ctl.main(
        ["--url", server.url, "list", "--target", "a b", "--status", "failed"]
    )

    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    assert server.requests[0][1] == "/api/admin/deploys?target=a+b&status=failed"
    assert lines[0].split() == [
        "ID",
        "TARGET",
        "STATUS",
        "STARTED",
        "FINISHED",
        "BEFORE",
        "REVISION",
        "REASON",
    ]
    assert lines[1].split() == [
        "d1",
        "app",
        "failed",
        "2026-03-13T14:00:00Z",
        "-",
        "a" * 12,
        "-",
        "step",
        "1",
    ]
