"""The TCP ports a unit's processes listen on, found from its control group.

The processes come from the control group's ``cgroup.procs`` files, their
sockets from the links in ``/proc/PID/fd``, and the listening ones from the
kernel's socket tables of each process's network namespace, read in
``/proc/PID/net/tcp`` and ``tcp6``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

# The state column of a socket table: 0A is LISTEN.
LISTEN = "0A"


def cgroup_root(sys_fs: Path = Path("/sys/fs/cgroup")) -> Path:
    """Where the control group paths systemd reports start on this machine."""
    if (sys_fs / "cgroup.controllers").exists():
        return sys_fs
    # A hybrid or legacy host: systemd's own hierarchy holds every unit.
    for name in ("unified", "systemd"):
        if (sys_fs / name / "cgroup.procs").exists():
            return sys_fs / name
    return sys_fs


def cgroup_pids(directory: Path) -> list[int]:
    """The processes in a control group and every group below it."""
    pids: list[int] = []
    for procs in sorted(directory.rglob("cgroup.procs")):
        try:
            pids += [int(pid) for pid in procs.read_text().split()]
        except (OSError, ValueError):
            continue
    return pids


def socket_inodes(pid: int, proc: Path = Path("/proc")) -> set[str]:
    """The inode numbers of the sockets a process holds open."""
    inodes = set()
    try:
        entries = list(os.scandir(proc / str(pid) / "fd"))
    except OSError:
        return inodes
    for entry in entries:
        try:
            target = os.readlink(entry.path)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def listening_in_table(table: str, inodes: set[str]) -> set[int]:
    """Ports of the sockets in ``inodes`` that a socket table shows listening."""
    ports = set()
    for row in table.splitlines()[1:]:
        fields = row.split()
        if len(fields) < 10 or fields[3] != LISTEN or fields[9] not in inodes:
            continue
        ports.add(int(fields[1].rpartition(":")[2], 16))
    return ports


def _namespace(pid: int, proc: Path) -> int | None:
    try:
        return os.stat(proc / str(pid) / "ns" / "net").st_ino
    except OSError:
        return None


def listening_ports(pids: Iterable[int], proc: Path = Path("/proc")) -> list[int]:
    """The TCP ports, IPv4 or IPv6, that any of ``pids`` listens on, lowest first."""
    inodes: set[str] = set()
    # One process per network namespace is enough to read its tables.
    readers: dict[int | None, int] = {}
    for pid in pids:
        held = socket_inodes(pid, proc)
        if held:
            inodes |= held
            readers.setdefault(_namespace(pid, proc), pid)

    ports: set[int] = set()
    for pid in readers.values():
        for name in ("tcp", "tcp6"):
            try:
                table = (proc / str(pid) / "net" / name).read_text()
            except OSError:
                continue
            ports |= listening_in_table(table, inodes)
    return sorted(ports)


def unit_ports(control_group: str, main_pid: int = 0) -> list[int]:
    """The ports a unit listens on, from its ``ControlGroup`` property."""
    pids: list[int] = []
    if control_group:
        pids = cgroup_pids(cgroup_root() / control_group.lstrip("/"))
    if not pids and main_pid:
        pids = [main_pid]
    return listening_ports(pids)
