"""``ares-deployd``: the daemon's command line, start-up and shutdown."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import waitress

from ares_deployd import __version__, sdnotify
from ares_deployd import config as configuration
from ares_deployd.api import deploys, services
from ares_deployd.api.app import create_app
from ares_deployd.errors import DeploydError
from ares_deployd.journal import Journal
from ares_deployd.monitor import Monitor
from ares_deployd.runner import Runner
from ares_deployd.store import Store
from ares_deployd.systemd import LoopThread, Systemd

log = logging.getLogger("ares_deployd")

LOG_LEVEL_ENV = "ARES_DEPLOYD_LOG_LEVEL"
# Threads serving requests; each open stream holds one.
THREADS = 16

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
        self.monitor = Monitor(lambda: self.config, self.systemd, self.loop)
        self.server: Any = None

    def start(self) -> None:
        """Connect to systemd, re-attach to running deployments, and listen."""
        self.loop.run(self.systemd.connect(), timeout=30)
        self.runner.prepare()
        attached = self.loop.run(self.runner.reattach(), timeout=30)
        self.loop.run(self.monitor.start(), timeout=30)
        routes = {
            "/api/admin/deploy": deploys.Deploy(self.runner),
            "/api/admin/deploy/{id}": deploys.DeploymentResource(self.runner),
            "/api/admin/deploy/{id}/cancel": deploys.Cancel(self.runner),
            "/api/admin/deploy/{id}/log": deploys.Log(self.runner),
            "/api/admin/deploys": deploys.DeployList(self.runner),
            **services.routes(
                lambda: self.config, self.monitor, self.runner, Journal()
            ),
        }
        app = create_app(lambda: self.secret, routes)
        listen = self.config.server.listen
        self.server = waitress.create_server(
            app,
            host=listen.host,
            port=listen.port,
            threads=THREADS,
            ident="ares-deployd",
            clear_untrusted_proxy_headers=True,
            max_request_body_size=1024 * 1024,
        )
        log.info(
            "listening on %s with %d targets; re-attached to %d running deployments",
            listen,
            len(self.config.targets),
            attached,
        )
        sdnotify.notify("READY=1", f"STATUS=Listening on {listen}")

    def reload(self) -> None:
        """Read the configuration again; keep the old one if the new one is bad."""
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
        if fresh.server.listen != self.config.server.listen:
            log.warning("a new listen address takes effect only on restart")
        self.config, self.secret = fresh, secret
        self.monitor.reconfigure()
        log.info("configuration reloaded: %d targets", len(fresh.targets))

    def serve(self) -> None:
        self.server.run()

    def stop(self) -> None:
        sdnotify.notify("STOPPING=1")
        if self.server is not None:
            self.server.close()
        try:
            self.monitor.stop()
        except Exception:
            log.debug("stopping the service monitor failed", exc_info=True)
        try:
            self.systemd.disconnect()
        except Exception:
            log.debug("disconnecting from the bus failed", exc_info=True)
        self.loop.stop()
        self.store.close()


def check_config(path: str) -> int:
    """Print ``ok`` or every problem; a missing secret is a warning only, since
    the file is often checked on another machine than the one it is for."""
    try:
        loaded = configuration.load(path)
    except configuration.ConfigError as error:
        print("\n".join(error.problems), file=sys.stderr)
        return 1
    try:
        configuration.load_secret(loaded)
    except DeploydError as error:
        print(
            f"warning: {error.message}; the daemon will not start without it",
            file=sys.stderr,
        )
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

    daemon = Daemon(loaded, secret)
    try:
        daemon.start()
    except (DeploydError, OSError, TimeoutError) as error:
        log.error("not starting: %s", getattr(error, "message", None) or error)
        daemon.stop()
        return 1

    def on_term(signum: int, frame: object) -> None:
        log.info("stopping on %s", signal.Signals(signum).name)
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGHUP, lambda signum, frame: daemon.reload())
    try:
        daemon.serve()
    except SystemExit:
        pass
    finally:
        daemon.stop()
    log.info("stopped")
    return 0
