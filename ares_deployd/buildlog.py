"""Build logs on disk: one append-only file per deployment.

The build unit appends its output to the file; the daemon appends its own lines
before the build starts and after it ends. Byte offsets into the file are stable,
so readers can resume from where they stopped.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

log = logging.getLogger(__name__)

OUTPUT_LIMIT = 1024 * 1024
STEP_MARK = "==> Step "
_STEP_LINE = re.compile(rb"==> Step (\d+)/\d+: ")


def log_path(state_dir: Path, deployment_id: str) -> Path:
    return state_dir / "logs" / f"{deployment_id}.log"


def result_path(state_dir: Path, deployment_id: str) -> Path:
    return state_dir / "results" / deployment_id


def append(path: Path, text: str) -> bool:
    """Add the daemon's own lines to a build log; False when the disk refused.

    A full disk must not stop a deployment from being recorded, so the error is
    logged and swallowed here.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
    except OSError as error:
        log.error("cannot write to %s: %s", path, error.strerror)
        return False
    return True


def space_left(directory: Path) -> int:
    """Bytes free for the daemon in ``directory``'s filesystem."""
    try:
        stats = os.statvfs(directory)
    except OSError:
        return 0
    return stats.f_bavail * stats.f_frsize


def size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def tail(path: Path, deployment_id: str, limit: int = OUTPUT_LIMIT) -> str:
    """The log as text, cut to its last ``limit`` bytes with a note saying so."""
    try:
        with open(path, "rb") as handle:
            total = os.fstat(handle.fileno()).st_size
            if total <= limit:
                return handle.read().decode(errors="replace")
            handle.seek(total - limit)
            data = handle.read(limit)
    except FileNotFoundError:
        return ""
    # Start at a line boundary so the first line shown is whole.
    newline = data.find(b"\n")
    if 0 <= newline < len(data) - 1:
        data = data[newline + 1 :]
    note = (
        f"[output cut: the last {len(data)} of {total} bytes; the whole log is at "
        f"GET /api/admin/deploy/{deployment_id}/log and {path}]\n"
    )
    return note + data.decode(errors="replace")


def read_from(path: Path, offset: int) -> bytes:
    """The bytes of the log from ``offset`` on (nothing when past the end)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            return handle.read()
    except FileNotFoundError:
        return b""


REVISION_MARK = "==> Revision "
# The markers stand first and last in a build's output; no need to read it all.
_REVISION_WINDOW = 64 * 1024


def revisions(path: Path) -> tuple[str | None, str | None]:
    """The revisions the build printed before its first step and after its last."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(_REVISION_WINDOW)
            total = os.fstat(handle.fileno()).st_size
            handle.seek(max(0, total - _REVISION_WINDOW))
            end = handle.read()
    except FileNotFoundError:
        return None, None
    before = after = None
    for line in head.decode(errors="replace").splitlines():
        if line.startswith(REVISION_MARK + "before: "):
            before = line.split(": ", 1)[1].strip()
            break
    for line in end.decode(errors="replace").splitlines():
        if line.startswith(REVISION_MARK + "after: "):
            after = line.split(": ", 1)[1].strip()
    return (
        None if before in (None, "unknown") else before,
        None if after in (None, "unknown") else after,
    )


def last_step(path: Path) -> int | None:
    """The number of the last step the build started, from its marker lines."""
    number = None
    try:
        with open(path, "rb") as handle:
            for line in handle:
                match = _STEP_LINE.match(line)
                if match:
                    number = int(match.group(1))
    except FileNotFoundError:
        return None
    return number
