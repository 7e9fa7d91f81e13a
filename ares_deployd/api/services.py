"""The service resources: state, journal lines, and start, stop and restart."""

from __future__ import annotations

from collections.abc import Callable

import falcon

from ares_deployd import journal
from ares_deployd.config import Config
from ares_deployd.errors import bad_request, conflict, not_found
from ares_deployd.journal import Journal
from ares_deployd.monitor import Monitor, ServiceView
from ares_deployd.runner import Runner

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


def _lines(req: falcon.Request) -> int:
    raw = req.get_param("lines")
    if raw is None:
        return journal.DEFAULT_LINES
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

    def __init__(self, monitor: Monitor, reader: Journal) -> None:
        self.monitor = monitor
        self.reader = reader

    def on_get(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        view = _find(self.monitor, name)
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


def routes(
    config: Callable[[], Config], monitor: Monitor, runner: Runner, reader: Journal
) -> dict[str, object]:
    """The service resources by URI template, for :func:`create_app`."""
    found: dict[str, object] = {
        "/api/admin/services": ServiceList(monitor),
        "/api/admin/services/{name}": ServiceResource(monitor),
        "/api/admin/services/{name}/logs": Logs(monitor, reader),
    }
    for verb in ("start", "stop", "restart"):
        found[f"/api/admin/services/{{name}}/{verb}"] = Control(
            verb, config, monitor, runner
        )
    return found
