"""The HTTP server: waitress on the configured address or on sockets from systemd.

The daemon turns waitress's event loop itself, one short round at a time, so that
it can stop gracefully: on stop it closes the listening sockets, lets the requests
in flight finish within a bound, and only then closes every connection. Between
rounds it runs the work signal handlers asked for, outside of signal context.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import waitress
from waitress import wasyncore
from waitress.channel import HTTPChannel
from waitress.task import ErrorTask

from ares_deployd.api.app import HTTP_CODES
from ares_deployd.config import Listen
from ares_deployd.errors import DeploydError

log = logging.getLogger(__name__)

# The first descriptor systemd passes (SD_LISTEN_FDS_START).
LISTEN_FDS_START = 3
# How long requests in flight may take to finish once a stop is asked for.
DRAIN_TIMEOUT = 10.0
# Longest wait of one round of the loop; signals are seen within it.
ROUND = 0.5
# A connection quiet for this long between requests is closed on stop; a fresh
# one gets the time for its request to arrive.
IDLE_GRACE = 1.0
# Connections open at once: waitress's own limit of 100 lets a hundred idle
# connections, which need no secret, shut every other client out.
CONNECTION_LIMIT = 1000
# A connection with no request in flight is closed after this many seconds.
CHANNEL_TIMEOUT = 30


def inherited_sockets() -> list[socket.socket]:
    """The listening sockets systemd passed to this process (``LISTEN_FDS``).

    Empty when there are none or they are meant for another process. The
    variables are removed so that children do not take the sockets for theirs.

    Raises:
        DeploydError: ``bad_socket`` when a passed descriptor is not a stream
            socket waitress can serve on.
    """
    pid = os.environ.pop("LISTEN_PID", "")
    count = os.environ.pop("LISTEN_FDS", "")
    os.environ.pop("LISTEN_FDNAMES", None)
    if not pid.isdigit() or int(pid) != os.getpid() or not count.isdigit():
        return []

    sockets = []
    for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + int(count)):
        os.set_inheritable(fd, False)
        try:
            sock = socket.socket(fileno=fd)
        except OSError as error:
            raise DeploydError(
                500, "bad_socket", f"descriptor {fd} from systemd: {error.strerror}"
            ) from None
        if sock.type != socket.SOCK_STREAM or sock.family not in (
            socket.AF_INET,
            socket.AF_INET6,
            socket.AF_UNIX,
        ):
            sock.detach()
            raise DeploydError(
                500,
                "bad_socket",
                f"descriptor {fd} from systemd is not a stream socket "
                "(the socket unit needs ListenStream=)",
            )
        sockets.append(sock)
    return sockets


class _JSONErrorTask(ErrorTask):
    """What waitress refuses before the app sees it (framing, sizes), answered
    in the API's one error format rather than waitress's plain text."""

    def execute(self) -> None:
        error = self.request.error
        body = json.dumps(
            {
                "error": HTTP_CODES.get(error.code, "bad_request"),
                "message": f"{error.reason}: {error.body}",
            }
        ).encode()
        self.status = f"{error.code} {error.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        # The request could not be read to its end, so neither can the next.
        self.response_headers.append(("Connection", "close"))
        self.close_on_finish = True
        self.content_length = len(body)
        self.write(body)


class _Channel(HTTPChannel):
    error_task_class = _JSONErrorTask


class _Wakeup(wasyncore.dispatcher):
    """The reading end of the signal wake-up socket; what it reads is dropped."""

    def __init__(self, sock: socket.socket, map: dict, writer: socket.socket) -> None:
        super().__init__(sock, map)
        self._writer = writer

    def writable(self) -> bool:
        return False

    def handle_read(self) -> None:
        self.recv(512)

    def close(self) -> None:
        super().close()
        self._writer.close()


def describe(sock: socket.socket) -> str:
    address = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return str(address)
    if sock.family == socket.AF_INET6:
        return f"[{address[0]}]:{address[1]}"
    return f"{address[0]}:{address[1]}"


class HTTPServer:
    """waitress serving ``app`` until :meth:`stop`, then draining gracefully."""

    def __init__(
        self,
        app: Any,
        listen: Listen,
        sockets: list[socket.socket],
        threads: int,
        stopping: threading.Event | None = None,
    ) -> None:
        self._map: dict[int, Any] = {}
        where: dict[str, Any] = {"sockets": sockets}
        if not sockets:
            where = {"host": listen.host, "port": listen.port}
        try:
            self._server = waitress.create_server(
                app,
                map=self._map,
                threads=threads,
                ident="ares-deployd",
                clear_untrusted_proxy_headers=True,
                max_request_body_size=1024 * 1024,
                asyncore_use_poll=True,
                # Reading on while a request runs is how waitress sees a client
                # leave mid-answer; streams ask it (waitress.client_disconnected).
                channel_request_lookahead=1,
                connection_limit=CONNECTION_LIMIT,
                channel_timeout=CHANNEL_TIMEOUT,
                **where,
            )
        except ValueError as error:
            # waitress refuses a mix of UNIX and Internet sockets this way.
            raise DeploydError(500, "bad_socket", str(error)) from None
        for dispatcher in self._map.values():
            if getattr(dispatcher, "accepting", False):
                dispatcher.channel_class = _Channel
        self.activated = bool(sockets)
        self.addresses = [describe(sock) for sock in self._listeners()]
        self.heartbeat = time.monotonic()
        self._stop_requested = False
        self._pending: list[Callable[[], None]] = []
        # Set once the listening sockets are closed and requests are draining.
        self.stopping = stopping or threading.Event()

    def _listeners(self) -> list[socket.socket]:
        return [
            dispatcher.socket
            for dispatcher in self._map.values()
            if getattr(dispatcher, "accepting", False)
        ]

    def _channels(self) -> list[Any]:
        return [
            dispatcher
            for dispatcher in self._map.values()
            if hasattr(dispatcher, "requests")
        ]

    def call_soon(self, work: Callable[[], None]) -> None:
        """Run ``work`` on the serving thread between two rounds (signal-safe)."""
        self._pending.append(work)

    def stop(self) -> None:
        """Ask :meth:`serve` to stop; safe to call from a signal handler."""
        self._stop_requested = True

    def serve(self) -> None:
        """Serve until :meth:`stop`, then let requests in flight finish."""
        self._wake_on_signals()
        while not self._stop_requested:
            self._round()

        for dispatcher in list(self._map.values()):
            if getattr(dispatcher, "accepting", False):
                # Only the socket: the server's close() would also close the
                # trigger that threads still finishing a response wake us by.
                wasyncore.dispatcher.close(dispatcher)
        self.stopping.set()
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while (busy := self._close_idle()) and time.monotonic() < deadline:
            self._round()
        if busy:
            log.warning(
                "stopping after %.0fs; connections still busy: %d", DRAIN_TIMEOUT, busy
            )

        self._server.task_dispatcher.shutdown(cancel_pending=True, timeout=2)
        if threading.current_thread() is threading.main_thread():
            signal.set_wakeup_fd(-1)
        wasyncore.close_all(self._map)

    def _wake_on_signals(self) -> None:
        """End the wait of a round when a signal arrives, so that its work runs
        at once rather than at the end of the round."""
        if threading.current_thread() is not threading.main_thread():
            return
        reader, writer = socket.socketpair()
        writer.setblocking(False)
        _Wakeup(reader, self._map, writer)
        signal.set_wakeup_fd(writer.fileno())

    def _round(self) -> None:
        self.heartbeat = time.monotonic()
        while self._pending:
            self._pending.pop(0)()
        wasyncore.loop(timeout=ROUND, map=self._map, use_poll=True, count=1)

    def _close_idle(self) -> int:
        """Close connections with nothing in flight; how many are still busy."""
        busy = 0
        quiet_since = time.time() - IDLE_GRACE
        for channel in self._channels():
            working = channel.requests or channel.request is not None
            recent = channel.last_activity > quiet_since
            if working or channel.total_outbufs_len or recent:
                busy += 1
            elif not channel.will_close:
                # The loop closes it on its next round, as waitress does for
                # connections that timed out.
                channel.will_close = True
        return busy
