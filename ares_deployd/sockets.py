"""The TCP ports a unit's processes listen on, found from its control group.

The processes come from the control group's ``cgroup.procs`` files, their
sockets from the links in ``/proc/PID/fd``, and the listening ones from the
kernel's socket tables of each process's network namespace, read in
``/proc/PID/net/tcp`` and ``tcp6``.
"""

from __future__ import annotations

import os
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


def listening_in_table(table: str) -> dict[str, int]:
    """The listening sockets of a socket table: port by socket inode."""
    listening = {}
    for row in table.splitlines()[1:]:
        fields = row.split()
        if len(fields) >= 10 and fields[3] == LISTEN:
            listening[fields[9]] = int(fields[1].rpartition(":")[2], 16)
    return listening


def _namespace(pid: int, proc: Path) -> int | None:
    try:
        return os.stat(proc / str(pid) / "ns" / "net").st_ino
    except OSError:
        return None


def listening_ports(
    groups: dict[str, list[int]], proc: Path = Path("/proc")
) -> dict[str, list[int]]:
    """For each group of processes, the TCP ports (IPv4 or IPv6) it listens on.

    Each network namespace's tables are read once for all groups: reading one
    walks every socket of the namespace, and costs milliseconds on a busy host.
    """
    held: dict[str, set[str]] = {}
    # One process per network namespace is enough to read its tables.
    readers: dict[int | None, int] = {}
    for key, pids in groups.items():
        held[key] = set()
        for pid in pids:
            inodes = socket_inodes(pid, proc)
            if inodes:
                held[key] |= inodes
                readers.setdefault(_namespace(pid, proc), pid)

    listening: dict[str, int] = {}
    for pid in readers.values():
        for name in ("tcp", "tcp6"):
            try:
                table = (proc / str(pid) / "net" / name).read_text()
            except OSError:
                continue
            listening.update(listening_in_table(table))

    return {
        key: sorted({listening[inode] for inode in inodes if inode in listening})
        for key, inodes in held.items()
    }


def unit_ports(units: dict[str, tuple[str, int]]) -> dict[str, list[int]]:
    """For each unit, the ports its processes listen on, from its
    ``ControlGroup`` property, or its main process when that is unknown."""
    root = cgroup_root()
    groups = {}
    for unit, (control_group, main_pid) in units.items():
        pids = cgroup_pids(root / control_group.lstrip("/")) if control_group else []
        groups[unit] = pids or ([main_pid] if main_pid else [])
    return listening_ports(groups)
