"""A unit's journal, read with ``journalctl --output=json`` and shown as
``journalctl -o short`` prints it.

:func:`render` turns one parsed JSON entry into that line, following the rules
of systemd 252's journalctl: the time of the entry in local time, the host, the
identifier and PID with their fallbacks, tabs as eight spaces, colour and
hyperlink sequences removed, continuation lines indented under the first. Where
journalctl would print ``[16B blob data]`` for a message that is not printable
UTF-8, :func:`render` shows its text instead: invalid bytes as U+FFFD, escape
sequences and other control characters removed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import select
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ares_deployd.errors import DeploydError, bad_request

log = logging.getLogger(__name__)

DEFAULT_LINES = 100
MAX_LINES = 10000
TIMEOUT = 10.0

# Everything render() reads; journalctl adds the cursor and timestamps itself.
FIELDS = (
    "MESSAGE",
    "_HOSTNAME",
    "SYSLOG_IDENTIFIER",
    "_COMM",
    "_PID",
    "SYSLOG_PID",
    "_SOURCE_REALTIME_TIMESTAMP",
)

# journalctl leaves out a host or identifier this long rather than print it.
PRINT_CHAR_THRESHOLD = 300
# The largest time systemd formats: the end of the year 9999, in microseconds.
REALTIME_MAX = 253402214399999999

_CURSOR = re.compile(r"[a-z]=[0-9a-f]{1,64}(;[a-z]=[0-9a-f]{1,64}){0,15}")
_TRAILING_RETURNS = re.compile(rb"\r+(?=\n|\Z)")
# What journalctl strips, and in group 1 what it skips over unchanged: ESC and
# the byte after it, when that opens neither a colour nor a hyperlink sequence.
_STRIPPED = re.compile(rb"(\x1b[^\[\]])|\x1b\[[0-9;\x00]*m|\x1b\][ -~]*\x07")
# What remains of escape sequences in a message that is not printable: whole
# CSI, OSC and other ESC sequences, then a lone ESC.
_SEQUENCES = re.compile(
    rb"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b\n]*(?:\x07|\x1b\\)|\x1b[ -/]*[0-~]|\x1b"
)
# Control characters as systemd counts them; tab and newline are fine.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_UNPRINTED = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")
# Code points systemd refuses as text: U+FDD0..U+FDEF and the last two of each plane.
_NONCHARACTER = re.compile(
    "[\ufdd0-\ufdef"
    + "".join(
        f"{chr(plane + 0xFFFE)}{chr(plane + 0xFFFF)}"
        for plane in range(0, 0x110000, 0x10000)
    )
    + "]"
)


@dataclass(frozen=True)
class Page:
    """Lines read from a journal, and the cursor to continue after them."""

    lines: list[str]
    cursor: str | None


def _last(value: Any) -> Any:
    """A field's value; journalctl shows the last of a repeated field."""
    if isinstance(value, list) and value and not isinstance(value[0], int):
        return value[-1]
    return value


def _printable(value: Any) -> str | None:
    """The value when journalctl would print it in the line's prefix, else None.

    The JSON output holds a value as a string exactly when it is printable
    UTF-8, so only strings under the length limit qualify.
    """
    if isinstance(value, str) and _size(value) < PRINT_CHAR_THRESHOLD:
        return value
    return None


def _size(text: str) -> int:
    """Length in bytes, as journalctl counts widths."""
    return len(text) if text.isascii() else len(text.encode())


_stamps: dict[int, str] = {}


def timestamp(entry: dict[str, Any]) -> str:
    """``Mar 13 14:03:42``: when the entry was logged, in local time."""
    usec = 0
    source = _last(entry.get("_SOURCE_REALTIME_TIMESTAMP"))
    if isinstance(source, str) and source.isdigit():
        usec = int(source)
    if not 0 < usec < REALTIME_MAX:
        usec = int(entry.get("__REALTIME_TIMESTAMP") or 0)
    second = usec // 1_000_000
    text = _stamps.get(second)
    if text is None:
        if len(_stamps) > 4096:
            _stamps.clear()
        # Month names as the C locale spells them, whatever the environment says.
        moment = time.localtime(second)
        text = (
            f"{_MONTHS[moment.tm_mon - 1]} {moment.tm_mday:02d} "
            f"{moment.tm_hour:02d}:{moment.tm_min:02d}:{moment.tm_sec:02d}"
        )
        _stamps[second] = text
    return text


_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun") + (
    "Jul",
    "Aug",
    "Sep",
    "Oct",
    "Nov",
    "Dec",
)


def strip_escapes(raw: bytes) -> bytes:
    """What journalctl keeps of a message before it prints it.

    Tabs become eight spaces; colour sequences (``ESC [`` digits and ``;`` up to
    ``m``) and hyperlink sequences (``ESC ]`` up to BEL) go; carriage returns go
    when only more of them and a newline or the end follow. Anything else stays,
    including a sequence cut short, as systemd 252 does.
    """
    if b"\x1b" not in raw and b"\t" not in raw and b"\r" not in raw:
        return raw
    raw = _TRAILING_RETURNS.sub(b"", raw)
    raw = _STRIPPED.sub(rb"\1", raw)
    return raw.replace(b"\t", b"        ")


def printable_text(raw: bytes) -> str | None:
    """``raw`` as text when systemd deems it printable UTF-8, else None."""
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        return None
    if _CONTROL.search(text) or _NONCHARACTER.search(text):
        return None
    return text


def readable_text(raw: bytes) -> str:
    """The words of a message that is not printable: invalid bytes and
    noncharacters as U+FFFD, escape sequences and control characters (but
    newline) removed."""
    text = _SEQUENCES.sub(b"", raw).decode(errors="replace")
    return _NONCHARACTER.sub("\ufffd", _UNPRINTED.sub("", text))


def message_text(value: Any) -> str:
    """The MESSAGE field of a JSON entry as the line shows it."""
    if isinstance(value, str):
        # A string in journalctl's JSON holds no control character but tab and
        # newline, so the tab is all that printing changes.
        return value.replace("\t", "        ") if "\t" in value else value
    if value is None:
        return "[message not available]"
    raw = strip_escapes(bytes(value))
    text = printable_text(raw)
    return text if text is not None else readable_text(raw)


def render(entry: dict[str, Any]) -> str | None:
    """One entry of ``journalctl --output=json`` as ``journalctl -o short``
    prints it, lines after the first indented under it; None for an entry
    without a message, which journalctl skips."""
    if "MESSAGE" not in entry:
        return None
    message = message_text(_last(entry["MESSAGE"]))

    stamp = timestamp(entry)
    parts = [stamp]
    width = len(stamp)
    host = _printable(_last(entry.get("_HOSTNAME")))
    if host is not None:
        parts.append(f" {host}")
        width += _size(host) + 1
    name = _printable(_last(entry.get("SYSLOG_IDENTIFIER")))
    if name is None:
        name = _printable(_last(entry.get("_COMM")))
    if name is not None:
        parts.append(f" {name}")
        width += _size(name) + 1
    else:
        # journalctl does not count this word when it indents further lines.
        parts.append(" unknown")
    pid = _printable(_last(entry.get("_PID")))
    if pid is None:
        pid = _printable(_last(entry.get("SYSLOG_PID")))
    if pid is not None:
        parts.append(f"[{pid}]")
        width += _size(pid) + 2
    parts.append(": ")
    head = "".join(parts)

    if "\n" not in message:
        return head + message
    pieces = message.split("\n")
    if message.endswith("\n"):
        pieces.pop()
    indent = "\n" + " " * (width + 2)
    return head + indent.join(pieces)


def parse_line(raw: bytes | str) -> tuple[str | None, str]:
    """One line of ``journalctl --output=json``: the rendered line and its cursor."""
    entry = json.loads(raw)
    return render(entry), entry["__CURSOR"]


def _unknown_cursor() -> DeploydError:
    return bad_request("bad_after", "after must be a cursor from an earlier answer")


def check_cursor(cursor: str) -> str:
    """``cursor`` when it has the shape of a journal cursor.

    Raises:
        DeploydError: ``bad_after`` (400).
    """
    if len(cursor) > 1024 or not _CURSOR.fullmatch(cursor):
        raise _unknown_cursor()
    return cursor


def parse_since(value: str) -> float:
    """An RFC 3339 time as seconds since the epoch.

    Raises:
        DeploydError: ``bad_since`` (400).
    """
    problem = bad_request(
        "bad_since",
        "since must be an RFC 3339 time with an offset, such as 2026-03-13T14:00:00Z",
    )
    if len(value) > 64 or "T" not in value.upper():
        raise problem
    try:
        moment = datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
    except ValueError:
        raise problem from None
    if moment.tzinfo is None:
        raise problem
    return max(moment.timestamp(), 0.0)


def command(
    unit: str,
    *,
    lines: int | None = None,
    since: float | None = None,
    after: str | None = None,
    follow: bool = False,
    program: str = "journalctl",
) -> list[str]:
    """The journalctl command line that reads ``unit``'s entries as JSON.

    With ``after`` or ``since`` it reads forward from there, at most ``lines``
    entries; otherwise the last ``lines``.
    """
    argv = [
        program,
        "--no-pager",
        "--quiet",
        "--output=json",
        # Without it, fields over 4096 bytes come as null; the field list keeps
        # large fields other than the message out.
        "--all",
        "--output-fields=" + ",".join(FIELDS),
        f"--unit={unit}",
    ]
    if lines is not None:
        argv.append(f"--lines={lines}")
    if since is not None:
        argv.append(f"--since=@{since:.6f}")
    if after is not None:
        argv.append(f"--after-cursor={after}")
    if follow:
        # Following otherwise reads the boot id from /proc/sys, which the
        # daemon's unit hides (ProcSubset=pid); --merge spares journalctl that
        # look, and JSON output has no boot separators for it to print anyway.
        argv += ["--follow", "--merge"]
    return argv


def spawn(argv: Sequence[str]) -> subprocess.Popen[bytes]:
    """Start journalctl in a process group of its own, its output piped.

    Raises:
        DeploydError: ``journal_failed`` (502) when it cannot start.
    """
    try:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as error:
        raise DeploydError(
            502, "journal_failed", f"cannot run {argv[0]}: {error.strerror}"
        ) from None


def collect(argv: Sequence[str], timeout: float = TIMEOUT) -> bytes:
    """Run a journalctl command line to its end and return what it printed.

    Its process group is killed whole when it overstays.

    Raises:
        DeploydError: ``journal_timeout`` (504) when it takes longer than
            ``timeout`` seconds, ``journal_failed`` (502) when it cannot start
            or exits with an error.
    """
    process = spawn(argv)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(process)
        log.warning("%s did not answer within %.0fs; killed it", argv[0], timeout)
        raise DeploydError(
            504,
            "journal_timeout",
            f"journalctl did not answer within {timeout:g}s",
        ) from None

    if process.returncode != 0:
        reason = err.decode(errors="replace").strip().splitlines()
        detail = reason[-1] if reason else f"exit status {process.returncode}"
        log.warning("%s failed: %s", argv[0], detail)
        raise DeploydError(502, "journal_failed", f"journalctl failed: {detail}")
    return out


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    """Kill the process and all it started; safe while it is not yet reaped."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    # Not read to the end: a process that left the group may still hold them.
    for stream in (process.stdout, process.stderr):
        if stream is not None:
            stream.close()


def page(output: bytes, after: str | None = None) -> Page:
    """The lines of journalctl's JSON output, and the cursor after the last."""
    output = output.strip()
    if not output:
        return Page([], after)
    # One object a line, and no raw newline inside one: parsed as one array,
    # which is more than twice as fast as line by line.
    entries = json.loads(b"[" + output.replace(b"\n", b",") + b"]")
    lines = [line for line in map(render, entries) if line is not None]
    return Page(lines, entries[-1]["__CURSOR"])


class Journal:
    """Reads units' journals through journalctl, each read bounded in time."""

    def __init__(self, program: str = "journalctl", timeout: float = TIMEOUT) -> None:
        self.program = program
        self.timeout = timeout

    def read(
        self,
        unit: str,
        lines: int = DEFAULT_LINES,
        since: float | None = None,
        after: str | None = None,
    ) -> Page:
        """Up to ``lines`` lines of ``unit``; see :func:`command` for which.

        Raises:
            DeploydError: ``journal_timeout`` (504) or ``journal_failed`` (502).
        """
        argv = command(
            unit, lines=lines, since=since, after=after, program=self.program
        )
        try:
            output = collect(argv, self.timeout)
        except DeploydError as error:
            # A cursor of the right shape that names no entry journalctl knows.
            if after is not None and "seek to cursor" in error.message:
                raise _unknown_cursor() from None
            raise
        try:
            return page(output, after)
        except (ValueError, KeyError, TypeError, AttributeError):
            raise DeploydError(
                502, "journal_failed", "journalctl printed something not JSON"
            ) from None

    def follow(self, unit: str, lines: int, after: str | None = None) -> Follower:
        """Follow ``unit``: the last ``lines`` entries (or those after the cursor
        ``after``), then each new one.

        Raises:
            DeploydError: ``bad_after`` (400) for a cursor journalctl cannot
                seek to, ``journal_failed`` (502) when it cannot start.
        """
        if after is not None:
            # Once the stream has begun, a refusal could only be an event.
            self.read(unit, 1, after=after)
        return Follower(self.program, unit, lines, after)


# A journalctl that ends while followed (journald restarted, files rotated) is
# started again from the last cursor, this many times in a row at most.
FOLLOW_RESTARTS = 5


class Follower:
    """New entries of a unit's journal as they come, from ``journalctl --follow``.

    Its journalctl runs in a process group of its own, killed whole on
    :meth:`close`; one that ends by itself is started again after the last
    entry seen, so that a restart of journald loses and repeats nothing.
    """

    def __init__(self, program: str, unit: str, lines: int, after: str | None) -> None:
        self._program = program
        self._unit = unit
        self.cursor = after
        self._buffer = b""
        self._restarts = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._start(lines if after is None else None)

    def _start(self, lines: int | None) -> None:
        argv = command(
            self._unit,
            lines=lines,
            after=self.cursor,
            follow=True,
            program=self._program,
        )
        self._process = spawn(argv)
        assert self._process.stdout is not None and self._process.stderr is not None
        os.set_blocking(self._process.stdout.fileno(), False)
        os.set_blocking(self._process.stderr.fileno(), False)
        self._buffer = b""

    def read(self, timeout: float) -> list[tuple[str, str]]:
        """The ``(cursor, line)`` of entries that arrived within ``timeout``.

        Raises:
            DeploydError: ``journal_failed`` (502) when journalctl keeps ending.
        """
        process = self._process
        assert process is not None and process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], timeout)
        if not ready:
            return []
        data = process.stdout.read()
        if data is None:
            return []
        if data:
            self._restarts = 0
            return self._parse(data)
        # The end of its output: journalctl exited. Reap it and start anew.
        said = (process.stderr.read() or b"") if process.stderr else b""
        reason = said.decode(errors="replace").strip().splitlines() or ["no reason"]
        self._stop()
        self._restarts += 1
        if self._restarts > FOLLOW_RESTARTS:
            raise DeploydError(
                502, "journal_failed", f"journalctl keeps ending: {reason[-1]}"
            )
        log.info(
            "journalctl ended while following %s (%s); starting it again",
            self._unit,
            reason[-1],
        )
        time.sleep(min(0.2 * self._restarts, 1.0))
        self._start(0 if self.cursor is None else None)
        return []

    def _parse(self, data: bytes) -> list[tuple[str, str]]:
        lines = (self._buffer + data).split(b"\n")
        self._buffer = lines.pop()
        found = []
        for raw in lines:
            if not raw.strip():
                continue
            try:
                line, cursor = parse_line(raw)
            except (ValueError, KeyError, TypeError, AttributeError):
                log.debug("journalctl printed a line that is not an entry: %r", raw)
                continue
            self.cursor = cursor
            if line is not None:
                found.append((cursor, line))
        return found

    def _stop(self) -> None:
        if self._process is not None:
            _kill_group(self._process)
            self._process = None

    def close(self) -> None:
        self._stop()
