"""Event framing, the stream cap, waking, and reading a growing log by lines."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from ares_deployd import streams
from ares_deployd.api.deploys import _LineReader
from ares_deployd.errors import DeploydError


def test_event_frames_id_name_and_each_line_as_data() -> None:
    framed = streams.event("one\rtwo\r\nthree", "output", "42")

    assert framed == (b"id: 42\nevent: output\ndata: one\ndata: two\ndata: three\n\n")


def test_event_without_id_or_name_is_data_alone() -> None:
    assert streams.event("") == b"data: \n\n"


def test_limit_refuses_past_the_cap_with_retry_after() -> None:
    limit = streams.StreamLimit(2)
    limit.acquire()
    limit.acquire()

    with pytest.raises(DeploydError) as refused:
        limit.acquire()

    assert refused.value.status == 503
    assert refused.value.code == "too_many_streams"
    assert int(refused.value.headers["Retry-After"]) > 0
    limit.release()
    limit.acquire()
    assert limit.open == 2


def test_guard_gives_its_place_back_once_when_closed() -> None:
    limit = streams.StreamLimit(1)
    limit.acquire()
    stream = streams.Stream(limit, threading.Event(), None)
    closed = []

    def body():
        try:
            yield b"a"
            yield b"b"
        finally:
            closed.append(True)

    guard = streams.Guard(stream, body())
    assert next(guard) == b"a"
    guard.close()
    guard.close()

    assert closed == [True]
    assert limit.open == 0


def test_stream_is_over_when_closing_or_the_client_left() -> None:
    closing = threading.Event()
    gone = [False]
    stream = streams.Stream(streams.StreamLimit(1), closing, lambda: gone[0])

    assert not stream.over()
    gone[0] = True
    assert stream.over()
    gone[0] = False
    closing.set()
    assert stream.over()


def test_waiter_wakes_when_the_file_grows(tmp_path: Path) -> None:
    path = tmp_path / "build.log"
    path.write_text("")
    waiter = streams.Waiter()
    assert waiter.watch(path)

    writer = threading.Timer(0.1, lambda: path.write_text("more\n"))
    writer.start()
    started = time.monotonic()
    woken = waiter.wait(5)
    waited = time.monotonic() - started
    writer.join()
    waiter.close()

    assert waited < 4
    assert woken is False


def test_waiter_wakes_on_wake_from_another_thread(tmp_path: Path) -> None:
    path = tmp_path / "quiet.log"
    path.write_text("")
    waiter = streams.Waiter()
    assert waiter.watch(path)
    wakeups = streams.Wakeups()

    with wakeups.registered("id", waiter):
        threading.Timer(0.1, lambda: wakeups.wake("id")).start()
        started = time.monotonic()
        woken = waiter.wait(5)

    assert time.monotonic() - started < 4
    assert woken is True
    waiter.close()


def test_line_reader_gives_whole_lines_with_their_offsets(tmp_path: Path) -> None:
    path = tmp_path / "build.log"
    path.write_bytes(b"first\nsecond\nhalf")
    reader = _LineReader(path, None)

    early = reader.events(final=False)
    with open(path, "ab") as handle:
        handle.write(b" a line\n")
    late = reader.events(final=False)
    reader.close()

    assert early == (
        b"id: 0\nevent: output\ndata: first\n\nid: 6\nevent: output\ndata: second\n\n"
    )
    assert late == b"id: 13\nevent: output\ndata: half a line\n\n"


def test_line_reader_resumes_after_the_line_at_the_offset(tmp_path: Path) -> None:
    path = tmp_path / "build.log"
    path.write_bytes(b"first\nsecond\nthird\n")

    reader = _LineReader(path, 6)
    resumed = reader.events(final=True)
    reader.close()

    assert resumed == b"id: 13\nevent: output\ndata: third\n\n"


def test_line_reader_final_sends_a_last_line_without_newline(tmp_path: Path) -> None:
    path = tmp_path / "build.log"
    path.write_bytes(b"done\nno newline")

    reader = _LineReader(path, None)
    everything = reader.events(final=True)
    reader.close()

    assert everything.endswith(b"id: 5\nevent: output\ndata: no newline\n\n")


def test_line_reader_shows_invalid_utf8_as_replacement(tmp_path: Path) -> None:
    path = tmp_path / "build.log"
    path.write_bytes(b"bad \xff byte\n")

    reader = _LineReader(path, None)
    framed = reader.events(final=True)
    reader.close()

    assert "bad \ufffd byte".encode() in framed


def test_line_reader_of_a_missing_log_is_empty(tmp_path: Path) -> None:
    reader = _LineReader(tmp_path / "not-yet.log", None)

    assert reader.events(final=True) == b""
