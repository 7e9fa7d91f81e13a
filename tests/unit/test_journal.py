"""Journal entries rendered as ``journalctl -o short`` prints them, and the
bounded run of journalctl itself."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ares_deployd import journal
from ares_deployd.errors import DeploydError

# 2026-03-13 14:03:42.5 UTC
WHEN = 1773410622_500000


@pytest.fixture(autouse=True)
def utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    journal._stamps.clear()
    yield
    monkeypatch.undo()
    time.tzset()
    journal._stamps.clear()


def entry(message: Any = "Listening on 0.0.0.0:3000", **fields: Any) -> dict:
    base = {
        "__CURSOR": "s=1;i=2",
        "__REALTIME_TIMESTAMP": str(WHEN),
        "_HOSTNAME": "vps",
        "SYSLOG_IDENTIFIER": "ares-server",
        "_COMM": "ares-server",
        "_PID": "12847",
        "MESSAGE": message,
    }
    base.update(fields)
    return {key: value for key, value in base.items() if value is not None}


def as_bytes(text: bytes) -> list[int]:
    return list(text)


def test_render_plain_entry_is_the_short_line() -> None:
    assert (
        journal.render(entry())
        == "Mar 13 14:03:42 vps ares-server[12847]: Listening on 0.0.0.0:3000"
    )


def test_render_time_is_local(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "Asia/Kolkata")
    time.tzset()
    journal._stamps.clear()

    assert journal.render(entry()).startswith("Mar 13 19:33:42 vps ")


def test_render_prefers_the_source_time_when_valid() -> None:
    source = str(WHEN - 3_000_000)

    assert journal.render(entry(_SOURCE_REALTIME_TIMESTAMP=source)).startswith(
        "Mar 13 14:03:39 "
    )
    assert journal.render(entry(_SOURCE_REALTIME_TIMESTAMP="0")).startswith(
        "Mar 13 14:03:42 "
    )


def test_render_day_of_month_is_two_digits() -> None:
    early = str(WHEN - 12 * 86400 * 1_000_000)

    assert journal.render(entry(__REALTIME_TIMESTAMP=early)).startswith("Mar 01 ")


def test_render_identifier_falls_back_to_command_name() -> None:
    long_name = "x" * 300

    line = journal.render(entry(SYSLOG_IDENTIFIER=long_name, _COMM="server"))
    binary = journal.render(entry(SYSLOG_IDENTIFIER=as_bytes(b"a\x01b")))

    assert line.startswith("Mar 13 14:03:42 vps server[12847]: ")
    assert binary.startswith("Mar 13 14:03:42 vps ares-server[12847]: ")
    assert journal.render(entry(SYSLOG_IDENTIFIER="x" * 299)).count("x") == 299


def test_render_without_identifier_or_command_says_unknown() -> None:
    line = journal.render(
        entry("one\ntwo", SYSLOG_IDENTIFIER=None, _COMM=None, _PID="7")
    )

    # journalctl leaves "unknown" out of the width it indents by.
    assert line == "Mar 13 14:03:42 vps unknown[7]: one\n" + " " * 24 + "two"


def test_render_pid_prefers_the_trusted_one() -> None:
    assert "ares-server[12847]: " in journal.render(entry(SYSLOG_PID="99"))
    assert "ares-server[99]: " in journal.render(entry(_PID=None, SYSLOG_PID="99"))
    assert "ares-server: " in journal.render(entry(_PID=None))


def test_render_without_hostname_leaves_it_out() -> None:
    assert journal.render(entry(_HOSTNAME=None)).startswith(
        "Mar 13 14:03:42 ares-server[12847]: "
    )


def test_render_repeated_fields_show_the_last() -> None:
    line = journal.render(entry(["first", "second"], SYSLOG_IDENTIFIER=["one", "two"]))

    assert line == "Mar 13 14:03:42 vps two[12847]: second"


def test_render_tabs_become_eight_spaces() -> None:
    assert journal.render(entry("a\tb")).endswith(": a        b")
    assert journal.render(entry(as_bytes(b"\x1b[1ma\tb"))).endswith(": a        b")


def test_render_colour_codes_are_removed_exactly() -> None:
    message = as_bytes(b"\x1b[31mred\x1b[0m text \x1b[1;32mok\x1b[m")

    assert journal.render(entry(message)).endswith("[12847]: red text ok")


def test_render_hyperlinks_are_removed() -> None:
    message = as_bytes(b"see \x1b]8;;http://x/\x07docs\x1b]8;;\x07 now")

    assert journal.render(entry(message)).endswith(": see docs now")


def test_render_multiline_indents_under_the_first_line() -> None:
    line = journal.render(entry("first\nsecond\n\n  fourth\n"))

    indent = " " * len("Mar 13 14:03:42 vps ares-server[12847]: ")
    assert line.split("\n") == [
        "Mar 13 14:03:42 vps ares-server[12847]: first",
        indent + "second",
        indent,
        indent + "  fourth",
    ]


def test_render_indent_counts_bytes_not_characters() -> None:
    line = journal.render(entry("a\nb", SYSLOG_IDENTIFIER="ïd"))

    assert (
        line.split("\n")[1]
        == " " * len("Mar 13 14:03:42 vps ïd[12847]: ".encode()) + "b"
    )


def test_render_empty_message_is_an_empty_line() -> None:
    assert journal.render(entry("")) == "Mar 13 14:03:42 vps ares-server[12847]: "


def test_render_entry_without_message_is_skipped() -> None:
    assert journal.render(entry(None)) is None


def test_render_invalid_utf8_shows_text_with_replacement() -> None:
    line = journal.render(entry(as_bytes(b"bad \xff\xfe end")))

    assert line.endswith(": bad \ufffd\ufffd end")


def test_render_blob_drops_escapes_and_controls() -> None:
    message = as_bytes(b"\x1b[2Jclear \x07bell \x1b(Bcharset \xc0 \x1b]0;title\x1b\\x")

    assert journal.render(entry(message)).endswith(": clear bell charset \ufffd x")


def test_render_carriage_returns_at_line_ends_are_dropped() -> None:
    assert journal.render(entry(as_bytes(b"done\r\r"))).endswith(": done")
    assert journal.render(entry(as_bytes(b"a\r\nb"))).split("\n")[0].endswith(": a")
    # One in the middle makes the message a blob, shown without it.
    assert journal.render(entry(as_bytes(b"50%\r100%"))).endswith(": 50%100%")


def test_render_noncharacter_is_not_printable() -> None:
    assert journal.printable_text("a\ufffeb".encode()) is None
    assert journal.printable_text("a\U0002fffeb".encode()) is None
    assert journal.printable_text("a\U00020000b".encode()) == "a\U00020000b"
    assert journal.render(entry(as_bytes("x\ufdd0".encode()))).endswith(": x\ufffd")


def test_strip_escapes_keeps_sequences_it_does_not_know() -> None:
    assert journal.strip_escapes(b"a\x1b[31") == b"a\x1b[31"
    assert journal.strip_escapes(b"a\x1b[38:5:1mb") == b"a\x1b[38:5:1mb"
    assert journal.strip_escapes(b"a\x1b]0;t\x1b\\b") == b"a\x1b]0;t\x1b\\b"
    assert journal.strip_escapes(b"a\x1b") == b"a\x1b"
    assert journal.strip_escapes(b"a\x1bXb") == b"a\x1bXb"
    assert journal.strip_escapes(b"a\x1b[3\x001mb") == b"ab"


def test_render_null_message_says_so() -> None:
    assert journal.render(entry(None, MESSAGE=None)) is None
    assert journal.message_text(None) == "[message not available]"


def test_parse_line_gives_line_and_cursor() -> None:
    raw = json.dumps(entry("hello", __CURSOR="s=ab;i=1")).encode()

    assert journal.parse_line(raw) == (
        "Mar 13 14:03:42 vps ares-server[12847]: hello",
        "s=ab;i=1",
    )


def test_page_cursor_is_after_the_last_entry_even_if_skipped() -> None:
    output = b"\n".join(
        json.dumps(item).encode()
        for item in (entry("one", __CURSOR="s=1"), entry(None, __CURSOR="s=2"))
    )

    page = journal.page(output + b"\n", after="s=0")

    assert page.lines == ["Mar 13 14:03:42 vps ares-server[12847]: one"]
    assert page.cursor == "s=2"
    assert journal.page(b"", after="s=0").cursor == "s=0"
    assert journal.page(b"").cursor is None


@pytest.mark.parametrize(
    "cursor", ["", "garbage", "s=xyz", "-s=1", "s=1;" * 20, "s=1\ni=2"]
)
def test_check_cursor_refuses_what_is_not_a_cursor(cursor: str) -> None:
    with pytest.raises(DeploydError) as refused:
        journal.check_cursor(cursor)

    assert refused.value.status == 400
    assert refused.value.code == "bad_after"


def test_check_cursor_accepts_a_journal_cursor() -> None:
    cursor = (
        "s=fe469b1720fa40b6992c0f875e815185;i=4d;b=304ad7ab534f4d4c936e9d27d10b4770;"
        "m=3950ce4c;t=661bfde0c69cd;x=93cda9c2fc6e7547"
    )

    assert journal.check_cursor(cursor) == cursor


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("2026-03-13T14:03:42Z", 1773410622.0),
        ("2026-03-13t14:03:42.25z", 1773410622.25),
        ("2026-03-13T19:33:42+05:30", 1773410622.0),
        ("1900-01-01T00:00:00Z", 0.0),
    ],
)
def test_parse_since_reads_rfc3339(value: str, seconds: float) -> None:
    assert journal.parse_since(value) == seconds


@pytest.mark.parametrize(
    "value", ["yesterday", "2026-03-13", "2026-03-13T14:03:42", "1773410622", ""]
)
def test_parse_since_refuses_other_times(value: str) -> None:
    with pytest.raises(DeploydError) as refused:
        journal.parse_since(value)

    assert refused.value.code == "bad_since"


def test_command_reads_forward_after_a_cursor() -> None:
    argv = journal.command("web.service", lines=5, after="s=1", since=12.5)

    assert argv[0] == "journalctl"
    assert "--unit=web.service" in argv
    assert "--lines=5" in argv
    assert "--after-cursor=s=1" in argv
    assert "--since=@12.500000" in argv
    assert "--all" in argv and "--output=json" in argv


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def test_collect_hanging_command_is_killed_with_its_children(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    script = f"sleep 60 & echo $! > {pids}; echo $$ >> {pids}; wait"

    started = time.monotonic()
    with pytest.raises(DeploydError) as refused:
        journal.collect(["sh", "-c", script], timeout=0.5)

    assert refused.value.status == 504
    assert refused.value.code == "journal_timeout"
    assert time.monotonic() - started < 10
    left = [int(pid) for pid in pids.read_text().split()]
    assert len(left) == 2
    deadline = time.monotonic() + 5
    while any(_alive(pid) for pid in left) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in left)


def test_collect_failing_command_is_502_with_its_reason() -> None:
    with pytest.raises(DeploydError) as refused:
        journal.collect(["sh", "-c", "echo 'Failed to open journal' >&2; exit 1"])

    assert refused.value.status == 502
    assert refused.value.code == "journal_failed"
    assert refused.value.message == "journalctl failed: Failed to open journal"


def test_collect_missing_program_is_502(tmp_path: Path) -> None:
    with pytest.raises(DeploydError) as refused:
        journal.collect([str(tmp_path / "no-journalctl")])

    assert refused.value.status == 502
    assert "cannot run" in refused.value.message


def test_journal_read_output_not_json_is_502(tmp_path: Path) -> None:
    program = tmp_path / "fake-journalctl"
    program.write_text("#!/bin/sh\necho not json\n")
    os.chmod(program, 0o755)

    with pytest.raises(DeploydError) as refused:
        journal.Journal(str(program)).read("web.service")

    assert refused.value.status == 502
