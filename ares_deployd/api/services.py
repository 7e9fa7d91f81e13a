"""The service resources: state, journal lines, and start, stop and restart."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import falcon

from ares_deployd import journal, streams
from ares_deployd.config import Config
from ares_deployd.errors import DeploydError, bad_request, conflict, not_found
from ares_deployd.journal import Journal
from ares_deployd.monitor import Monitor, ServiceView
from ares_deployd.runner import Runner
from ares_deployd.streams import Stream, StreamLimit

# Enough of an unknown name to recognise it in the error message.
NAME_SHOWN = 64


def _find(monitor: Monitor, name: str) -> ServiceView:
    """The configured service ``name``; any other name, however odd, is 404."""
    view = monitor.view(name)
    if view is None:
        shown = name if len(name) <= NAME_SHOWN else name[:NAME_SHOWN] + "..."
        known = ", ".join(monitor.views()) or "none configured"
        raise not_found("not_found", f"No service named {shown!r} (known: {known})")
    return view


# Following starts with as many lines as journalctl --follow shows.
FOLLOW_LINES = 10
_YES = ("1", "true", "yes", "on")
_NO = ("0", "false", "no", "off", "")


@dataclass
class LogStreams:
    """What the logs endpoint reads with, and what its streams share."""

    reader: Journal
    limit: StreamLimit
    closing: threading.Event


def _follow(req: falcon.Request) -> bool:
    raw = req.get_param("follow")
    if raw is None or raw.lower() in _NO:
        return False
    if raw.lower() in _YES:
        return True
    raise bad_request("bad_follow", "follow must be 1 or 0 (or true or false)")


def _lines(req: falcon.Request, default: int = journal.DEFAULT_LINES) -> int:
    raw = req.get_param("lines")
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or not (
        1 <= int(raw) <= journal.MAX_LINES
    ):
        raise bad_request(
            "bad_lines",
            f"lines must be a whole number from 1 to {journal.MAX_LINES}",
        )
    return int(raw)


class ServiceList:
    """``GET /api/admin/services``: every configured service by name."""

    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {
            name: view.summary() for name, view in self.monitor.views().items()
        }


class ServiceResource:
    """``GET /api/admin/services/{name}``: one service in more detail."""

    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor

    def on_get(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        resp.media = _find(self.monitor, name).detail()


class Logs:
    """``GET /api/admin/services/{name}/logs``: journal lines as journalctl
    prints them, with a cursor to continue from."""

    def __init__(self, monitor: Monitor, logs: LogStreams) -> None:
        self.monitor = monitor
        self.logs = logs
        self.reader = logs.reader

    def on_get(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        view = _find(self.monitor, name)
        if _follow(req):
            self._stream(req, resp, view)
            return
        lines = _lines(req)
        since = req.get_param("since")
        after = req.get_param("after")
        if since is not None and after is not None:
            raise bad_request(
                "since_and_after",
                "Give since or after, not both: after continues "
                "from an earlier answer, since starts at a time",
            )

        page = self.reader.read(
            view.service.unit,
            lines,
            since=journal.parse_since(since) if since is not None else None,
            after=journal.check_cursor(after) if after is not None else None,
        )

        resp.media = {
            "service": name,
            "unit": view.service.unit,
            "lines": page.lines,
            "cursor": page.cursor,
        }

    def _stream(
        self, req: falcon.Request, resp: falcon.Response, view: ServiceView
    ) -> None:
        lines = _lines(req, FOLLOW_LINES)
        if req.get_param("since") is not None:
            raise bad_request(
                "since_and_follow",
                "Give after (or Last-Event-ID) to follow from a point, not since",
            )
        after = req.get_param("after") or req.get_header("Last-Event-ID") or None
        if after is not None:
            after = journal.check_cursor(after.strip())

        unit = view.service.unit

        streams.answer(
            req,
            resp,
            self.logs.limit,
            self.logs.closing,
            lambda stream: _journal_events(
                stream, self.reader.follow(unit, lines, after)
            ),
        )


class Control:
    """``POST /api/admin/services/{name}/{verb}``: start, stop or restart the
    unit; the answer comes once systemd's job has ended."""

    def __init__(
        self,
        verb: str,
        config: Callable[[], Config],
        monitor: Monitor,
        runner: Runner,
    ) -> None:
        self.verb = verb
        self.config = config
        self.monitor = monitor
        self.runner = runner

    def on_post(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        unit = _find(self.monitor, name).service.unit
        targets = self.config().targets
        for deployment in self.runner.store.running():
            target = targets.get(deployment.target)
            if target is not None and target.restart == unit:
                raise conflict(
                    "service_busy",
                    f"Deployment {deployment.id} of {deployment.target} is running "
                    f"and restarts {unit}; wait for it or cancel it",
                    id=deployment.id,
                )

        view = self.monitor.control(name, self.verb)

        resp.media = {"action": self.verb, "job": "done", **view.detail()}


def _journal_events(stream: Stream, follower: journal.Follower) -> Iterator[bytes]:
    try:
        while not stream.over():
            try:
                found = follower.read(stream.until_keepalive())
            except DeploydError as error:
                # The answer has begun: the error can only be the last event.
                yield streams.event(json.dumps(error.to_json()), "error")
                return
            chunk = b"".join(
                streams.event(line, "line", cursor) for cursor, line in found
            )
            chunk = chunk or stream.keepalive()
            if chunk:
                stream.sent()
                yield chunk
    finally:
        follower.close()


def routes(
    config: Callable[[], Config], monitor: Monitor, runner: Runner, logs: LogStreams
) -> dict[str, object]:
    """The service resources by URI template, for :func:`create_app`."""
    found: dict[str, object] = {
        "/api/admin/services": ServiceList(monitor),
        "/api/admin/services/{name}": ServiceResource(monitor),
        "/api/admin/services/{name}/logs": Logs(monitor, logs),
    }
    for verb in ("start", "stop", "restart"):
        found[f"/api/admin/services/{{name}}/{verb}"] = Control(
            verb, config, monitor, runner
        )
    return found
