"""``ares-deployd``: the daemon's command line, start-up and shutdown."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from ares_deployd import __version__, sdnotify
from ares_deployd import config as configuration
from ares_deployd.api import deploys, openapi, services
from ares_deployd.api.app import create_app
from ares_deployd.errors import DeploydError
from ares_deployd.httpserver import HTTPServer, inherited_sockets
from ares_deployd.journal import Journal
from ares_deployd.monitor import Monitor
from ares_deployd.notify import Notifier, Outbox
from ares_deployd.runner import Runner
from ares_deployd.store import Store
from ares_deployd.streams import StreamLimit, Wakeups
from ares_deployd.supervision import Supervisor
from ares_deployd.systemd import LoopThread, Systemd

log = logging.getLogger("ares_deployd")

LOG_LEVEL_ENV = "ARES_DEPLOYD_LOG_LEVEL"
# Threads serving requests beside those that open streams may hold.
REQUEST_THREADS = 8


def threads_for(max_streams: int) -> int:
    """waitress's pool: a thread for each stream allowed, and some for the rest."""
    return max_streams + REQUEST_THREADS


# sd-daemon priorities, so that journald files each line at its level.
PRIORITIES = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


class JournalFormatter(logging.Formatter):
    """``<N>message``: journald reads the priority, and adds the time itself."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record).replace("\n", "\n  ")
        return f"<{PRIORITIES.get(record.levelno, 6)}>{text}"


def _stderr_is_journal() -> bool:
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(part) for part in stream.split(":"))
        info = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (info.st_dev, info.st_ino) == (device, inode)


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if _stderr_is_journal():
        handler.setFormatter(JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # waitress says "Serving on ..." at info; our own line says it better.
    logging.getLogger("waitress").setLevel(logging.WARNING)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="ares-deployd",
        description="Deploy and watch the services of this server through systemd, "
        "with an HTTP API. Runs in the foreground; logs go to stderr.",
        epilog="The configuration is read from --config, else "
        f"${configuration.CONFIG_ENV}, else {configuration.DEFAULT_PATH}. "
        "Exit status: 0 after a clean stop, 1 when the configuration or the "
        "secret is unusable or systemd cannot be "
        "reached.",
    )
    parser.add_argument("--config", metavar="PATH", help="the configuration file")
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="check the configuration, print ok or its problems, and exit 0 or 1 "
        "(a missing admin secret is a warning)",
    )
    parser.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default=os.environ.get(LOG_LEVEL_ENV, "info").lower(),
        help=f"least important messages to log (default: info, or ${LOG_LEVEL_ENV})",
    )
    parser.add_argument("--version", action="version", version=__version__)
    return parser.parse_args(argv)


class Daemon:
    """The running daemon: its configuration, store, systemd link and server."""

    def __init__(self, config: configuration.Config, secret: str) -> None:
        self.config = config
        self.secret = secret
        self.started = time.monotonic()
        self._lock = threading.Lock()
        state_dir = config.server.state_dir
        state_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
        self.store = Store(state_dir / "history.sqlite3")
        self.loop = LoopThread()
        self.systemd = Systemd(os.environ.get("ARES_DEPLOYD_BUS_ADDRESS"))
        self.runner = Runner(lambda: self.config, self.store, self.systemd, self.loop)
        self.metrics: Any = None
        if config.server.metrics_listen is not None:
            from ares_deployd.metrics import Metrics

            self.metrics = Metrics(self.store)
            self.runner.start_listeners.append(self.metrics.deployment_started)
            self.runner.listeners.append(self.metrics.deployment_finished)
        self.notifier = Notifier(
            lambda: self.config,
            self.store,
            Outbox(state_dir / "history.sqlite3"),
            self.metrics.notification if self.metrics else None,
        )
        self.runner.start_listeners.append(self.notifier.started)
        self.runner.listeners.append(self.notifier.finished)
        self.monitor = Monitor(lambda: self.config, self.systemd, self.loop)
        # Streams wait on these: a deployment's end wakes those that follow it.
        self.streams = StreamLimit(config.server.max_streams)
        self.wakeups = Wakeups()
        self.closing = threading.Event()
        self.runner.listeners.append(lambda ended: self.wakeups.wake(ended.id))
        self.server: HTTPServer | None = None
        self.supervisor: Supervisor | None = None
        self.exit_status = 0
        self._stopping = False

    def routes(self) -> dict[str, object]:
        """The API's resources by URI template, as :meth:`start` serves them."""
        return {
            "/api/admin/deploy": deploys.Deploy(self.runner),
            "/api/admin/deploy/{id}": deploys.DeploymentResource(self.runner),
            "/api/admin/deploy/{id}/cancel": deploys.Cancel(self.runner),
            "/api/admin/deploy/{id}/rollback": deploys.Rollback(self.runner),
            "/api/admin/deploy/{id}/log": deploys.Log(self.runner),
            "/api/admin/deploy/{id}/events": deploys.Events(
                self.runner, self.streams, self.wakeups, self.closing
            ),
            "/api/admin/deploys": deploys.DeployList(self.runner),
            "/api/admin/openapi.json": openapi.Document(),
            **services.routes(
                lambda: self.config,
                self.monitor,
                self.runner,
                services.LogStreams(Journal(), self.streams, self.closing),
            ),
        }

    def start(self) -> None:
        """Connect to systemd, re-attach to running deployments, and listen."""
        self.loop.run(self.systemd.connect(), timeout=30)
        self.loop.submit(self._watch_bus())
        self.runner.prepare()
        self.notifier.catch_up()
        attached = self.loop.run(self.runner.reattach(), timeout=30)
        self.loop.run(self.monitor.start(), timeout=30)
        middleware: list[object] = []
        if self.metrics is not None:
            from ares_deployd.metrics import RequestMetrics

            middleware.append(RequestMetrics(self.metrics))
            self.metrics.watch_streams(lambda: self.streams.open)
            self.metrics.watch_services(
                lambda: {
                    name: view.status for name, view in self.monitor.views().items()
                }
            )
            self.metrics.serve(self.config.server.metrics_listen)
        app = create_app(lambda: self.secret, self.routes(), middleware)
        self.loop.submit(self.notifier.run())
        server = HTTPServer(
            app,
            self.config.server.listen,
            inherited_sockets(),
            threads_for(self.config.server.max_streams),
            stopping=self.closing,
        )
        self.server = server
        listening = ", ".join(server.addresses)
        log.info(
            "listening on %s%s with %d targets; re-attached to %d running deployments",
            listening,
            " (sockets from systemd)" if server.activated else "",
            len(self.config.targets),
            attached,
        )
        self.supervisor = Supervisor(
            self.store,
            self.loop,
            listening,
            lambda: server.heartbeat,
            lambda: self.systemd.connected,
        )
        self.runner.listeners.append(self.supervisor.refresh)
        self.runner.start_listeners.append(self.supervisor.refresh)
        self.supervisor.start()
        sdnotify.notify("READY=1", f"STATUS={self.supervisor.line()}")

    async def _watch_bus(self) -> None:
        # Signals sent while disconnected are lost for good, so rather than
        # reconnect, exit: systemd starts the daemon again (Restart=on-failure),
        # and it re-attaches to every running deployment from scratch.
        try:
            await self.systemd.wait_for_disconnect()
        except Exception as error:
            log.debug("the bus connection ended: %s", error)
        if not self._stopping:
            log.error("lost the connection to the system bus; exiting to start afresh")
            self.exit_status = 1
            os.kill(os.getpid(), signal.SIGTERM)

    def reload(self) -> None:
        """Read the configuration again; keep the old one if the new one is bad."""
        sdnotify.notify("RELOADING=1")
        try:
            self._reload()
        finally:
            sdnotify.notify("READY=1")

    def _reload(self) -> None:
        try:
            fresh = configuration.load(self.config.path)
            secret = configuration.load_secret(fresh)
        except configuration.ConfigError as error:
            for problem in error.problems:
                log.error("reload refused: %s", problem)
            return
        except DeploydError as error:
            log.error("reload refused: %s", error.message)
            return
        # What the daemon set up at start stays as it was until a restart.
        kept = {}
        for key in ("listen", "metrics_listen", "state_dir", "max_streams"):
            old, new = getattr(self.config.server, key), getattr(fresh.server, key)
            if old != new:
                kept[key] = old
                if key != "listen" or not (self.server and self.server.activated):
                    log.warning("server.%s: a new value takes effect on restart", key)
        fresh = dataclasses.replace(
            fresh, server=dataclasses.replace(fresh.server, **kept)
        )
        warn_unreachable(fresh)
        self.config, self.secret = fresh, secret
        self.monitor.reconfigure()
        log.info("configuration reloaded: %d targets", len(fresh.targets))

    def serve(self) -> None:
        assert self.server is not None
        self.server.serve()

    def stop(self) -> None:
        """Close everything; builds go on in their own units."""
        self._stopping = True
        if self.supervisor is not None:
            self.supervisor.stop()
        if self.metrics is not None:
            self.metrics.stop()
        try:
            self.monitor.stop()
        except Exception:
            log.debug("stopping the service monitor failed", exc_info=True)
        try:
            self.systemd.disconnect()
        except Exception:
            log.debug("disconnecting from the bus failed", exc_info=True)
        self.loop.stop()
        self.notifier.close()
        self.store.close()


def warn_unreachable(config: configuration.Config) -> None:
    for warning in configuration.unreachable(config):
        log.warning("%s", warning)


def check_config(path: str) -> int:
    """Print ``ok`` or every problem; a missing secret is a warning only, since
    the file is often checked on another machine than the one it is for."""
    # Run as the unit's ExecReload=, its lines go to the journal at their level.
    error_mark, warning_mark = ("<3>", "<4>") if _stderr_is_journal() else ("", "")
    try:
        loaded = configuration.load(path)
    except configuration.ConfigError as error:
        for problem in error.problems:
            print(f"{error_mark}{problem}", file=sys.stderr)
        return 1
    try:
        configuration.load_secret(loaded)
    except DeploydError as error:
        print(
            f"{warning_mark}warning: {error.message}; the daemon will not start "
            "without it",
            file=sys.stderr,
        )
    for warning in configuration.unreachable(loaded):
        print(f"{warning_mark}warning: {warning}", file=sys.stderr)
    print("ok")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    path = configuration.resolve_path(args.config)
    if args.check_config:
        return check_config(path)

    setup_logging(args.log_level)
    try:
        loaded = configuration.load(path)
        secret = configuration.load_secret(loaded)
    except configuration.ConfigError as error:
        for problem in error.problems:
            log.error("%s", problem)
        log.error("not starting: the configuration has problems")
        return 1
    except DeploydError as error:
        log.error("not starting: %s", error.message)
        return 1

    warn_unreachable(loaded)
    daemon = Daemon(loaded, secret)
    try:
        daemon.start()
    except (DeploydError, OSError, TimeoutError) as error:
        log.error("not starting: %s", getattr(error, "message", None) or error)
        daemon.stop()
        return 1

    server = daemon.server
    assert server is not None

    def on_term(signum: int, frame: object) -> None:
        log.info("stopping on %s", signal.Signals(signum).name)
        if daemon.supervisor is not None:
            daemon.supervisor.stop_reporting()
        sdnotify.notify("STOPPING=1", "STATUS=Stopping: finishing requests in flight")
        server.stop()
        # Streams end at their next wake once the server is closing; wake them
        # when it is.
        server.call_soon(daemon.wakeups.wake_all)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGHUP, lambda signum, frame: server.call_soon(daemon.reload))
    try:
        daemon.serve()
    finally:
        daemon.stop()
    log.info("stopped")
    return daemon.exit_status
