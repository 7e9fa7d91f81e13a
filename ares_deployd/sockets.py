"""The TCP ports a unit's processes listen on, found from its control group.

The kernel's socket diagnostics (``NETLINK_SOCK_DIAG``) list every listening
TCP socket, IPv4 and IPv6, each with the cgroup v2 id of the group its creator
was in. A cgroup v2 id is the inode number of the group's directory in the
cgroup2 file system, so a unit's sockets are those whose id is that of its
control group's directory or of one below it. Listing sockets this way needs
no privilege and no look into other processes' ``/proc``, which a daemon
running with ``ProtectProc=invisible`` does not have.

What this cannot find:

- sockets of another network namespace than the daemon's: a unit with
  ``PrivateNetwork=`` or ``NetworkNamespacePath=`` listens out of its sight;
- sockets created outside the unit, such as those systemd passes to a
  socket-activated service: they count for PID 1's group;
- anything on Linux before 5.7, which does not report cgroup ids, or on a host
  without a cgroup2 hierarchy.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x001
# NLM_F_ROOT | NLM_F_MATCH: every socket the request's fields select.
NLM_F_DUMP = 0x300
TCP_LISTEN = 10
INET_DIAG_CGROUP_ID = 21

# struct nlmsghdr: length, type, flags, sequence number, sender's port id.
HEADER = struct.Struct("=IHHII")
# struct inet_diag_req_v2: family, protocol, extensions, padding, states, then
# a socket id whose zero ports select every socket.
REQUEST = struct.Struct("=BBBxI48x")
# struct inet_diag_msg: family, state, timer, retransmits, then the socket id,
# whose source port is big-endian, and fields not needed here.
ANSWER = struct.Struct("=BBxx2s66x")
# struct rtattr: length, type. The type's two top bits are flags.
ATTRIBUTE = struct.Struct("=HH")
ATTRIBUTE_TYPE = 0x3FFF
CGROUP_ID = struct.Struct("=Q")
ERROR_CODE = struct.Struct("=i")

CGROUP_FS = Path("/sys/fs/cgroup")

# More than any datagram of a dump, which the kernel keeps within 32 KiB.
READ_SIZE = 1 << 16
# The kernel answers at once; this only bounds a read that would never end.
TIMEOUT = 5.0


@dataclass(frozen=True)
class Listener:
    """A listening TCP socket: its port, and the cgroup v2 id it belongs to
    (None from a kernel that does not report it)."""

    port: int
    cgroup: int | None


def _align(length: int) -> int:
    return (length + 3) & ~3


def dump_request(family: int, sequence: int) -> bytes:
    """The request for every listening TCP socket of ``family``."""
    body = REQUEST.pack(family, socket.IPPROTO_TCP, 0, 1 << TCP_LISTEN)
    flags = NLM_F_REQUEST | NLM_F_DUMP
    header = HEADER.pack(
        HEADER.size + len(body), SOCK_DIAG_BY_FAMILY, flags, sequence, 0
    )

    return header + body


def _listener(payload: bytes) -> Listener | None:
    if len(payload) < ANSWER.size:
        raise OSError(errno.EBADMSG, "short socket diagnostics answer")
    _, state, port = ANSWER.unpack_from(payload)
    if state != TCP_LISTEN:
        return None

    cgroup = None
    offset = ANSWER.size
    while offset + ATTRIBUTE.size <= len(payload):
        length, kind = ATTRIBUTE.unpack_from(payload, offset)
        if length < ATTRIBUTE.size or offset + length > len(payload):
            raise OSError(errno.EBADMSG, "malformed socket diagnostics attribute")
        value = payload[offset + ATTRIBUTE.size : offset + length]
        if kind & ATTRIBUTE_TYPE == INET_DIAG_CGROUP_ID and len(value) == 8:
            (cgroup,) = CGROUP_ID.unpack(value)
        offset += _align(length)

    return Listener(int.from_bytes(port, "big"), cgroup)


def parse_answer(data: bytes, sequence: int) -> tuple[list[Listener], bool]:
    """The listening sockets in one datagram of a dump's answer, and whether the
    dump ended with it.

    Raises:
        OSError: the kernel refused the request or its answer is malformed.
    """
    listeners = []
    done = False
    offset = 0
    while offset + HEADER.size <= len(data) and not done:
        length, kind, _, seq, _ = HEADER.unpack_from(data, offset)
        if length < HEADER.size or offset + length > len(data):
            raise OSError(errno.EBADMSG, "malformed socket diagnostics message")
        payload = data[offset + HEADER.size : offset + length]
        offset += _align(length)
        # Left over from an earlier request on the socket: not this dump's.
        if seq != sequence:
            continue

        if kind in (NLMSG_ERROR, NLMSG_DONE):
            # Both carry a negated errno first, or 0 when the dump went well.
            code = -ERROR_CODE.unpack_from(payload)[0] if payload else 0
            if code > 0:
                raise OSError(code, os.strerror(code))
            done = kind == NLMSG_DONE
        elif kind == SOCK_DIAG_BY_FAMILY:
            listener = _listener(payload)
            if listener is not None:
                listeners.append(listener)

    return listeners, done


def listening_sockets() -> list[Listener]:
    """Every listening TCP socket, IPv4 and IPv6, of this process's network
    namespace.

    Raises:
        OSError: the kernel has no socket diagnostics, refused the request or
            answered something malformed.
    """
    listeners: list[Listener] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as sock:
        sock.settimeout(TIMEOUT)
        for sequence, family in enumerate((socket.AF_INET, socket.AF_INET6), 1):
            sock.send(dump_request(family, sequence))
            done = False
            while not done:
                data, _, flags, _ = sock.recvmsg(READ_SIZE)
                if flags & socket.MSG_TRUNC:
                    raise OSError(errno.EMSGSIZE, "socket diagnostics cut short")
                found, done = parse_answer(data, sequence)
                listeners += found

    return listeners


def cgroup2_root() -> Path | None:
    """Where the cgroup2 hierarchy is mounted: ``/sys/fs/cgroup``, or
    ``unified`` below it on a hybrid host; None without one."""
    # Only cgroup2 directories hold cgroup.controllers.
    for candidate in (CGROUP_FS, CGROUP_FS / "unified"):
        if (candidate / "cgroup.controllers").exists():
            return candidate

    return None


def cgroup_ids(directory: Path) -> set[int]:
    """The cgroup v2 ids of a control group and of every group below it."""
    ids = set()
    # A group that goes away meanwhile is simply left out.
    for path, _, _ in os.walk(directory):
        try:
            ids.add(os.stat(path).st_ino)
        except OSError:
            continue

    return ids


@functools.cache
def _cannot(reason: str) -> None:
    # Once per reason: the lookup runs again every health interval.
    log.warning(
        "cannot find the ports services listen on (%s); give each service its"
        " port in the configuration",
        reason,
    )


def unit_ports(control_groups: dict[str, str]) -> dict[str, list[int]]:
    """For each unit, the TCP ports its processes listen on, from its
    ``ControlGroup`` property; none where that is empty or ports cannot be
    found on this host (logged once)."""
    ports: dict[str, list[int]] = {unit: [] for unit in control_groups}
    root = cgroup2_root()
    if root is None:
        _cannot("no cgroup2 hierarchy is mounted")
        return ports
    try:
        listeners = listening_sockets()
    except OSError as error:
        _cannot(f"socket diagnostics failed: {error}")
        return ports
    if listeners and all(listener.cgroup is None for listener in listeners):
        _cannot("the kernel does not report the control group of sockets")
        return ports

    by_group: dict[int, set[int]] = {}
    for listener in listeners:
        if listener.cgroup is not None:
            by_group.setdefault(listener.cgroup, set()).add(listener.port)
    for unit, group in control_groups.items():
        if not group:
            continue
        found: set[int] = set()
        for cgroup in cgroup_ids(root / group.lstrip("/")):
            found |= by_group.get(cgroup, set())
        ports[unit] = sorted(found)

    return ports
