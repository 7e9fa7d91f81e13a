"""Listening ports from the kernel's socket diagnostics, matched by control group.

The answers are built here byte by byte, after the kernel's layout, rather than
with the structures of the module under test.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from ares_deployd import sockets
from ares_deployd.sockets import Listener

SEQUENCE = 7
LISTEN = 10
ESTABLISHED = 1


def attribute(kind: int, value: bytes) -> bytes:
    """A netlink attribute: length, type, value, padded to four bytes."""
    length = 4 + len(value)
    return struct.pack("=HH", length, kind) + value + bytes(-length % 4)


def message(kind: int, payload: bytes, sequence: int = SEQUENCE) -> bytes:
    """A netlink message: length, type, flags (multi), sequence, port id."""
    length = 16 + len(payload)
    header = struct.pack("=IHHII", length, kind, 0x2, sequence, 0)
    return header + payload + bytes(-length % 4)


def socket_answer(
    port: int, cgroup: int | None = None, state: int = LISTEN, family: int = 10
) -> bytes:
    """One socket as SOCK_DIAG_BY_FAMILY reports it, with a few attributes."""
    # Socket id: ports (big-endian), addresses, interface, cookie.
    identity = struct.pack(">HH", port, 0) + bytes(32) + struct.pack("=I", 1)
    identity += b"\xff" * 8
    # Expiry, queues, uid, inode.
    tail = struct.pack("=5I", 0, 0, 0, 0, 4242)
    body = struct.pack("=4B", family, state, 0, 0) + identity + tail
    # Shutdown state and IPv6-only flag: one byte each, so padded.
    attributes = attribute(8, b"\x00") + attribute(11, b"\x01")
    if cgroup is not None:
        attributes += attribute(21, struct.pack("=Q", cgroup))
    attributes += attribute(16, struct.pack("=I", 0))
    return message(20, body + attributes)


def done(code: int = 0, sequence: int = SEQUENCE) -> bytes:
    return message(3, struct.pack("=i", code), sequence)


def error(code: int) -> bytes:
    # The error code, then the header of the request it answers.
    return message(2, struct.pack("=i", code) + bytes(16))


def test_dump_request_asks_for_listening_tcp_sockets_of_a_family() -> None:
    request = sockets.dump_request(socket.AF_INET6, 3)

    length, kind, flags, sequence, port_id = struct.unpack_from("=IHHII", request)
    family, protocol, extensions, _, states = struct.unpack_from("=4BI", request, 16)
    assert (length, len(request)) == (72, 72)
    assert (kind, flags, sequence, port_id) == (20, 0x301, 3, 0)
    assert (family, protocol, extensions) == (socket.AF_INET6, socket.IPPROTO_TCP, 0)
    assert states == 1 << LISTEN
    assert request[24:] == bytes(48)


def test_parse_answer_reads_each_sockets_port_and_cgroup() -> None:
    data = socket_answer(8080, cgroup=77) + socket_answer(443, cgroup=2**40 + 5)

    listeners, finished = sockets.parse_answer(data, SEQUENCE)

    assert listeners == [Listener(8080, 77), Listener(443, 2**40 + 5)]
    assert not finished


def test_parse_answer_ends_the_dump_at_done() -> None:
    data = socket_answer(8080, cgroup=77) + done()

    listeners, finished = sockets.parse_answer(data, SEQUENCE)

    assert listeners == [Listener(8080, 77)]
    assert finished


def test_parse_answer_from_a_kernel_without_cgroup_ids_has_none() -> None:
    listeners, _ = sockets.parse_answer(socket_answer(8080), SEQUENCE)

    assert listeners == [Listener(8080, None)]


def test_parse_answer_leaves_out_sockets_that_do_not_listen() -> None:
    data = socket_answer(8080, 77, state=ESTABLISHED) + socket_answer(9090, 77)

    listeners, _ = sockets.parse_answer(data, SEQUENCE)

    assert listeners == [Listener(9090, 77)]


def test_parse_answer_ignores_messages_of_another_request() -> None:
    data = done(sequence=SEQUENCE - 1) + socket_answer(8080, 77)

    listeners, finished = sockets.parse_answer(data, SEQUENCE)

    assert listeners == [Listener(8080, 77)]
    assert not finished


@pytest.mark.parametrize("answer", [error(-errno.EACCES), done(-errno.EACCES)])
def test_parse_answer_raises_the_error_the_kernel_answers(answer: bytes) -> None:
    with pytest.raises(OSError) as raised:
        sockets.parse_answer(answer, SEQUENCE)

    assert raised.value.errno == errno.EACCES


LISTENING_WITHOUT_ID = struct.pack("=4B", 2, LISTEN, 0, 0) + bytes(68)


@pytest.mark.parametrize(
    "data",
    [
        socket_answer(8080, 77)[:-4],
        message(20, bytes(40)),
        message(20, LISTENING_WITHOUT_ID + struct.pack("=HH", 12, 21) + bytes(4)),
    ],
    ids=["cut-message", "short-socket", "cut-attribute"],
)
def test_parse_answer_refuses_a_malformed_answer(data: bytes) -> None:
    with pytest.raises(OSError) as raised:
        sockets.parse_answer(data, SEQUENCE)

    assert raised.value.errno == errno.EBADMSG


def test_cgroup_ids_are_the_inodes_of_a_group_and_those_below(tmp_path: Path) -> None:
    (tmp_path / "worker" / "one").mkdir(parents=True)

    ids = sockets.cgroup_ids(tmp_path)

    assert ids == {
        os.stat(path).st_ino
        for path in (tmp_path, tmp_path / "worker", tmp_path / "worker" / "one")
    }
    assert sockets.cgroup_ids(tmp_path / "missing") == set()


def own_cgroup() -> str:
    with open("/proc/self/cgroup", encoding="utf-8") as f:
        for line in f:
            if line.startswith("0::"):
                return line[3:].strip()
    pytest.skip("this process is in no cgroup2 group")


def test_unit_ports_finds_a_socket_this_process_listens_on() -> None:
    if sockets.cgroup2_root() is None:
        pytest.skip("no cgroup2 hierarchy is mounted")
    with socket.socket() as listening, socket.socket() as bound_only:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        bound_only.bind(("127.0.0.1", 0))
        ports = listening.getsockname()[1], bound_only.getsockname()[1]

        found = sockets.unit_ports({"me": own_cgroup(), "unknown": ""})

    assert ports[0] in found["me"]
    assert ports[1] not in found["me"]
    assert found["unknown"] == []


@pytest.fixture
def fresh_warnings() -> Iterator[None]:
    sockets._cannot.cache_clear()
    yield
    sockets._cannot.cache_clear()


def test_unit_ports_without_socket_diagnostics_warns_once(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    fresh_warnings: None,
) -> None:
    def refused() -> list[Listener]:
        raise OSError(errno.EAFNOSUPPORT, "Address family not supported")

    monkeypatch.setattr(sockets, "listening_sockets", refused)
    monkeypatch.setattr(sockets, "cgroup2_root", lambda: Path("/sys/fs/cgroup"))
    caplog.set_level(logging.WARNING, logger=sockets.__name__)

    first = sockets.unit_ports({"web.service": "/system.slice/web.service"})
    second = sockets.unit_ports({"web.service": "/system.slice/web.service"})

    assert first == second == {"web.service": []}
    assert len(caplog.records) == 1
    assert "give each service its port" in caplog.records[0].getMessage()
