"""The HTTP server: passed sockets, and a stop that lets requests finish."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from ares_deployd import httpserver
from ares_deployd.config import Listen
from ares_deployd.errors import DeploydError
from ares_deployd.httpserver import HTTPServer, inherited_sockets


def app(environ, start_response):
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = json.dumps({"got": environ["wsgi.input"].read(length).decode()}).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]


class Running:
    def __init__(self, server: HTTPServer) -> None:
        self.server = server
        self.thread = threading.Thread(target=server.serve)
        self.thread.start()
        host, port = server.addresses[0].rsplit(":", 1)
        self.address = (host, int(port))

    def connect(self) -> socket.socket:
        return socket.create_connection(self.address, timeout=10)


@pytest.fixture
def running() -> Iterator[Running]:
    served = Running(HTTPServer(app, Listen("127.0.0.1", 0), [], threads=2))
    yield served
    served.server.stop()
    served.thread.join(20)


def post_head(length: int) -> bytes:
    return (
        "POST /echo HTTP/1.1\r\nHost: test\r\nContent-Type: text/plain\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def read_response(sock: socket.socket) -> str:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
        if b"\r\n\r\n" in data and data.endswith(b"}"):
            break
    return data.decode()


def test_httpserver_answers_on_the_configured_address(running: Running) -> None:
    with running.connect() as sock:
        sock.sendall(post_head(2) + b"hi")

        assert '{"got": "hi"}' in read_response(sock)


def test_httpserver_serves_on_a_passed_socket() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    served = Running(HTTPServer(app, Listen("127.0.0.1", 1), [listener], threads=2))

    try:
        with served.connect() as sock:
            sock.sendall(post_head(3) + b"abc")
            answer = read_response(sock)
    finally:
        served.server.stop()
        served.thread.join(20)

    assert served.server.activated
    assert served.server.addresses == [f"127.0.0.1:{port}"]
    assert '{"got": "abc"}' in answer


def test_httpserver_stop_finishes_the_request_in_flight(running: Running) -> None:
    with running.connect() as sock:
        sock.sendall(post_head(10) + b"hello")

        running.server.stop()
        running.server.stopping.wait(10)
        with pytest.raises(ConnectionRefusedError):
            running.connect()
        sock.sendall(b"world")
        answer = read_response(sock)

    running.thread.join(20)
    assert answer.startswith("HTTP/1.1 200 OK")
    assert '{"got": "helloworld"}' in answer
    assert not running.thread.is_alive()


def test_httpserver_stop_closes_idle_connections(running: Running) -> None:
    with running.connect() as sock:
        sock.sendall(post_head(1) + b"x")
        read_response(sock)

        running.server.stop()
        running.thread.join(20)

        assert not running.thread.is_alive()
        assert sock.recv(1) == b""


def test_httpserver_stop_gives_up_on_a_request_that_never_ends(
    monkeypatch,
) -> None:
    monkeypatch.setattr(httpserver, "DRAIN_TIMEOUT", 0.5)
    server = HTTPServer(app, Listen("127.0.0.1", 0), [], threads=2)
    served = Running(server)

    with served.connect() as sock:
        sock.sendall(post_head(100) + b"only part")
        server.stop()
        served.thread.join(20)

        assert not served.thread.is_alive()
        # Closed with unread data, the connection may end in a reset.
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(1) == b""


def test_inherited_sockets_ignores_sockets_meant_for_another_process(
    monkeypatch,
) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")

    assert inherited_sockets() == []
    assert "LISTEN_FDS" not in os.environ and "LISTEN_PID" not in os.environ


PASSED = """
import os, sys
os.environ["LISTEN_PID"] = str(os.getpid())
from ares_deployd.errors import DeploydError
from ares_deployd.httpserver import inherited_sockets
try:
    passed = inherited_sockets()
    print(" ".join(f"{s.family.name} {s.getsockname()[1]}" for s in passed))
except DeploydError as error:
    print(error.code, error.message)
"""


def run_with_fd3(sock: socket.socket) -> str:
    result = subprocess.run(
        [sys.executable, "-c", PASSED],
        env={**os.environ, "LISTEN_FDS": "1"},
        preexec_fn=lambda: os.dup2(sock.fileno(), 3),
        pass_fds=(3,),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_inherited_sockets_takes_the_socket_systemd_passed() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        assert run_with_fd3(listener) == f"AF_INET {port}"


def test_inherited_sockets_refuses_a_datagram_socket() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as datagram:
        datagram.bind(("127.0.0.1", 0))

        assert run_with_fd3(datagram).startswith(
            "bad_socket descriptor 3 from systemd is not a stream socket"
        )


def test_httpserver_refuses_unix_and_internet_sockets_together(tmp_path) -> None:
    inet = socket.create_server(("127.0.0.1", 0))
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(str(tmp_path / "api.sock"))
    unix.listen()

    with pytest.raises(DeploydError) as caught:
        HTTPServer(app, Listen("127.0.0.1", 1), [inet, unix], threads=1)

    assert caught.value.code == "bad_socket"
    inet.close()
    unix.close()
