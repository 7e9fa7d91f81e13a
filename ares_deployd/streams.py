"""Server-sent event streams: their framing, their cap, and waking them up.

waitress gives every open stream a thread of its own for as long as it lasts, so
the number open at once is capped below the size of its pool. A stream waits in
:class:`Waiter` for its source to change: a build log growing (inotify), a
deployment ending (an eventfd the runner's listener writes to), or its client
going away (checked at every wake, at least once a second).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import select
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import falcon

from ares_deployd.errors import DeploydError

log = logging.getLogger(__name__)

MEDIA_TYPE = "text/event-stream"
HEADERS = {
    "Cache-Control": "no-cache",
    # nginx buffers answers unless told not to; a stream must pass through.
    "X-Accel-Buffering": "no",
}
# A comment this often keeps proxies and clients from taking the stream for dead.
KEEPALIVE = 15.0
# The longest a stream sleeps before it looks again at its client and the daemon.
TICK = 1.0
RETRY_AFTER = 5

_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC
_IN_MODIFY = 0x002
_IN_CLOSE_WRITE = 0x008
_IN_ATTRIB = 0x004
_IN_DELETE_SELF = 0x400
_IN_MOVE_SELF = 0x800


def event(data: str, name: str | None = None, id: str | None = None) -> bytes:
    """One event; each line of ``data`` (split at CR or LF) is a ``data:`` field."""
    parts = []
    if id is not None:
        parts.append(f"id: {id}\n")
    if name is not None:
        parts.append(f"event: {name}\n")
    for line in data.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        parts.append(f"data: {line}\n")
    parts.append("\n")
    return "".join(parts).encode()


def comment(text: str) -> bytes:
    return f": {text}\n\n".encode()


class StreamLimit:
    """How many streams may be open at once, and how many are."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._open = 0
        self._lock = threading.Lock()

    @property
    def open(self) -> int:
        return self._open

    def acquire(self) -> None:
        """Take a place, or refuse the request.

        Raises:
            DeploydError: ``too_many_streams`` (503) with ``Retry-After`` when
                all places are taken.
        """
        with self._lock:
            if self._open >= self.cap:
                raise DeploydError(
                    503,
                    "too_many_streams",
                    f"All {self.cap} event streams are in use; try again shortly",
                    headers={"Retry-After": str(RETRY_AFTER)},
                )
            self._open += 1

    def release(self) -> None:
        with self._lock:
            self._open -= 1


class _Inotify:
    """The libc calls behind inotify, or None where they are not to be had."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self.init1 = libc.inotify_init1
        self.init1.argtypes = [ctypes.c_int]
        self.add_watch = libc.inotify_add_watch
        self.add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]


_inotify: _Inotify | None
try:
    _inotify = _Inotify()
except (OSError, AttributeError):
    _inotify = None


class Waiter:
    """Sleeps until a file changes, :meth:`wake` is called, or a timeout passes.

    Without inotify it falls back to looking every ``poll`` seconds.
    """

    def __init__(self, poll: float = 0.05) -> None:
        self._poll = poll
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._inotify = -1
        self._watching: Path | None = None
        if _inotify is not None:
            fd = _inotify.init1(_IN_NONBLOCK | _IN_CLOEXEC)
            if fd >= 0:
                self._inotify = fd

    def watch(self, path: Path) -> bool:
        """Wake on changes of ``path`` too; False when it cannot be watched yet."""
        if self._inotify < 0 or self._watching == path:
            return self._watching == path
        mask = _IN_MODIFY | _IN_CLOSE_WRITE | _IN_ATTRIB | _IN_DELETE_SELF
        if (
            _inotify is None
            or _inotify.add_watch(
                self._inotify, os.fsencode(path), mask | _IN_MOVE_SELF
            )
            < 0
        ):
            return False
        self._watching = path
        return True

    def wake(self) -> None:
        """Safe from any thread, and while the waiter is closed."""
        with contextlib.suppress(OSError):
            os.eventfd_write(self._wake, 1)

    def wait(self, timeout: float) -> bool:
        """True when :meth:`wake` was called, False for a change or a timeout."""
        readers = [self._wake]
        if self._inotify >= 0 and self._watching is not None:
            readers.append(self._inotify)
        else:
            timeout = min(timeout, self._poll)
        try:
            ready, _, _ = select.select(readers, [], [], max(timeout, 0))
        except InterruptedError:
            return False
        for fd in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(fd, 65536)
        return self._wake in ready

    def close(self) -> None:
        for fd in (self._wake, self._inotify):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._wake = self._inotify = -1


class Wakeups:
    """Waiters by the key they wait on, so that whoever changes a key wakes them."""

    def __init__(self) -> None:
        self._waiters: dict[str, set[Waiter]] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def registered(self, key: str, waiter: Waiter) -> Iterator[None]:
        with self._lock:
            self._waiters.setdefault(key, set()).add(waiter)
        try:
            yield
        finally:
            with self._lock:
                waiters = self._waiters.get(key, set())
                waiters.discard(waiter)
                if not waiters:
                    self._waiters.pop(key, None)

    def wake(self, key: str) -> None:
        with self._lock:
            waiters = list(self._waiters.get(key, ()))
        for waiter in waiters:
            waiter.wake()

    def wake_all(self) -> None:
        with self._lock:
            waiters = [w for group in self._waiters.values() for w in group]
        for waiter in waiters:
            waiter.wake()


class Stream:
    """What every stream shares: its place under the cap, and when to stop.

    ``gone`` tells whether the client has left; ``closing`` is set when the
    daemon stops, and ends every stream at its next wake.
    """

    def __init__(
        self,
        limit: StreamLimit,
        closing: threading.Event,
        gone: Callable[[], bool] | None,
    ) -> None:
        self.limit = limit
        self.closing = closing
        self._gone = gone or (lambda: False)
        self.last_sent = time.monotonic()

    def over(self) -> bool:
        return self.closing.is_set() or self._gone()

    def keepalive(self) -> bytes:
        """A comment when the stream has been quiet too long, else nothing."""
        if time.monotonic() - self.last_sent < KEEPALIVE:
            return b""
        self.last_sent = time.monotonic()
        return comment("keep-alive")

    def sent(self) -> None:
        self.last_sent = time.monotonic()

    def until_keepalive(self) -> float:
        """How long to sleep: to the next keep-alive, and never past a tick."""
        left = KEEPALIVE - (time.monotonic() - self.last_sent)
        return max(0.0, min(TICK, left))


def answer(
    req: falcon.Request,
    resp: falcon.Response,
    limit: StreamLimit,
    closing: threading.Event,
    body: Callable[[Stream], Iterator[bytes]],
) -> None:
    """Make ``resp`` the stream ``body`` writes, under the cap.

    Raises:
        DeploydError: ``too_many_streams`` (503), or whatever ``body`` raises
            before it starts; the place under the cap is not kept then.
    """
    limit.acquire()
    try:
        # waitress's own check for a client that went away, where it has one.
        gone = req.env.get("waitress.client_disconnected")
        stream = Stream(limit, closing, gone)
        events = body(stream)
    except BaseException:
        limit.release()
        raise

    resp.content_type = MEDIA_TYPE
    resp.set_headers(HEADERS)
    resp.stream = Guard(stream, events)


class Guard:
    """A stream's body, holding its place under the cap until it is closed.

    The place is taken before the answer starts (:meth:`StreamLimit.acquire`),
    so that a refusal is an ordinary error. waitress closes the body when the
    stream ends or its client leaves; a body never closed gives its place back
    when it is collected.
    """

    def __init__(self, stream: Stream, body: Iterator[bytes]) -> None:
        self._stream = stream
        self._body = body
        self._released = False

    def __iter__(self) -> Guard:
        return self

    def __next__(self) -> bytes:
        return next(self._body)

    def close(self) -> None:
        if self._released:
            return
        self._released = True
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            self._stream.limit.release()

    def __del__(self) -> None:
        self.close()
