"""``ares-deployctl``: the command-line client of the ares-deployd API.

It starts deployments and follows their output as it is written, shows and
lists them, cancels and rolls them back, and shows the services and their
journal. Output is made for people (aligned tables, colour on a terminal) or,
with ``--json``, is what the API answered, for scripts.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NoReturn, TextIO

from ares_deployd import __version__, config
from ares_deployd.client import (
    DEFAULT_URL,
    SECRET_ENV,
    URL_ENV,
    Client,
    Event,
    path_part,
    resolve_connection,
)
from ares_deployd.errors import DeploydError

PROG = "ares-deployctl"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_ERROR = 3
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141

# Service jobs may take the daemon up to 2 minutes to see through.
CONTROL_TIMEOUT = 150.0
# How long following stays silent before the status line shows.
TICK = 1.0
REVISION_SHOWN = 12

DEPLOY_COLOURS = {"success": "32", "failed": "31", "cancelled": "33", "running": "36"}
SERVICE_COLOURS = {"running": "32", "degraded": "33", "stopped": "31"}
HEALTH_COLOURS = {"passing": "32", "failing": "31", "unknown": "33"}

EPILOG = f"""\
connection:
  The API is --url, else ${URL_ENV}, else the [server] listen address
  of the daemon's configuration when it can be read, else
  {DEFAULT_URL}. The secret is read from --secret-file, else
  ${SECRET_ENV}, else from the admin_secret_file that the daemon's
  configuration names (--config, else ${config.CONFIG_ENV}, else
  {config.DEFAULT_PATH}): run as root on the server, it needs
  neither.

output:
  Tables for people, in colour only when standard output is a terminal
  and NO_COLOR is unset or empty. --json prints what the API answered
  instead; for a followed deployment, the deployment as it ended.

exit status:
  0    success
  1    the deployment failed or was cancelled
  2    a usage error
  3    the API could not be reached, refused the secret, or answered an error
  130  interrupted (Ctrl-C); a deployment being followed goes on

Every error is one line on standard error that starts with "Error: ".
"""


def result_code(status: str) -> int:
    """The exit status for a deployment that ended with ``status``."""
    return EXIT_OK if status == "success" else EXIT_FAILED


def colour_enabled(stream: TextIO, environ: Mapping[str, str]) -> bool:
    """Colour for ``stream``: only a terminal, and never with NO_COLOR set."""
    if environ.get("NO_COLOR", ""):
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def paint(text: str, code: str | None, enabled: bool) -> str:
    """``text`` in the SGR colour ``code``, when colour is enabled."""
    if not enabled or not code:
        return text
    return f"\033[{code}m{text}\033[0m"


def format_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    colour: Callable[[int, str], str | None] | None = None,
    enabled: bool = False,
) -> list[str]:
    """Rows aligned under their headers, two spaces apart, with no trailing blanks.

    ``colour(column, text)`` names the colour of a cell; widths are measured on
    the text, so colour never shifts a column.
    """
    widths = [len(header) for header in headers]
    for row in rows:
        for column, cell in enumerate(row):
            widths[column] = max(widths[column], len(cell))

    lines = []
    for index, row in enumerate([list(headers), *rows]):
        cells = []
        for column, cell in enumerate(row):
            code = colour(column, cell) if colour and index else None
            pad = " " * (widths[column] - len(cell))
            cells.append(paint(cell, code, enabled) + pad)
        lines.append("  ".join(cells).rstrip())
    return lines


def format_fields(pairs: Sequence[tuple[str, str]]) -> list[str]:
    """``name  value`` lines with the values aligned."""
    width = max((len(name) for name, _ in pairs), default=0)
    return [f"{name.ljust(width)}  {value}".rstrip() for name, value in pairs]


def shown(value: Any) -> str:
    """A JSON value as a table cell; nothing is ``-``."""
    if value is None or value == "":
        return "-"
    return str(value)


def short_revision(value: Any) -> str:
    return "-" if value is None else str(value)[:REVISION_SHOWN]


def elapsed_since(stamp: str | None, now: float | None = None) -> str:
    """The time since an RFC 3339 UTC ``stamp`` (or since now), e.g. ``1m12s``."""
    now = time.time() if now is None else now
    start = now
    if stamp:
        try:
            start = (
                datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ")
                .replace(tzinfo=UTC)
                .timestamp()
            )
        except ValueError:
            start = now
    return config.format_duration(max(0.0, now - start))


class StatusLine:
    """One line on a terminal's standard error, rewritten in place."""

    def __init__(self, stream: TextIO, enabled: bool) -> None:
        self.stream = stream
        self.enabled = enabled
        self._shown = False

    def show(self, text: str) -> None:
        if not self.enabled:
            return
        self.stream.write("\r\033[K" + text)
        self.stream.flush()
        self._shown = True

    def clear(self) -> None:
        if not self._shown:
            return
        self.stream.write("\r\033[K")
        self.stream.flush()
        self._shown = False


@dataclass
class Context:
    """What a command works with: its options, the API, and where it writes."""

    args: argparse.Namespace
    out: TextIO
    err: TextIO
    colour: bool
    status: StatusLine
    _client: Client | None = field(default=None, repr=False)

    @property
    def json(self) -> bool:
        return bool(self.args.json)

    @property
    def client(self) -> Client:
        if self._client is None:
            url, secret = resolve_connection(
                self.args.url, self.args.secret_file, self.args.config
            )
            self._client = Client(url, secret)
        return self._client

    def line(self, text: str = "") -> None:
        self.status.clear()
        self.out.write(text + "\n")
        self.out.flush()

    def lines(self, texts: Sequence[str]) -> None:
        for text in texts:
            self.line(text)

    def note(self, text: str) -> None:
        self.status.clear()
        self.err.write(text + "\n")
        self.err.flush()

    def dump(self, value: Any, indent: int | None = 2) -> None:
        self.line(json.dumps(value, indent=indent, ensure_ascii=False))


# Following streams.


_END = object()


def _in_background(events: Iterator[Event]) -> queue.Queue[Any]:
    """Read ``events`` on a thread of its own, so waiting can be shown meanwhile."""
    found: queue.Queue[Any] = queue.Queue()

    def read() -> None:
        try:
            for event in events:
                found.put(event)
        except BaseException as error:  # handed to the reader, who raises it
            found.put(error)
        else:
            found.put(_END)

    threading.Thread(target=read, name="events", daemon=True).start()
    return found


def _pump(
    ctx: Context, events: Iterator[Event], waiting: Callable[[], str]
) -> Iterator[Event]:
    """The events as they come; while none comes, ``waiting()`` on the status line."""
    found = _in_background(events)
    while True:
        try:
            item = found.get(timeout=TICK)
        except queue.Empty:
            ctx.status.show(waiting())
            continue
        if item is _END:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


def _output_line(ctx: Context, data: str) -> None:
    bold = "1" if data.startswith("==> ") else None
    ctx.line(paint(data, bold, ctx.colour))


def follow_deployment(
    ctx: Context, deployment_id: str, target: str, started_at: str | None
) -> int:
    """Print a deployment's output as it is written; its exit status once it ends."""
    events = ctx.client.events(
        f"/api/admin/deploy/{path_part(deployment_id)}/events", final="status"
    )
    final = None
    try:
        for event in _pump(
            ctx, events, lambda: f"{target}: running {elapsed_since(started_at)}"
        ):
            if event.type == "output" and not ctx.json:
                _output_line(ctx, event.data)
            elif event.type == "status":
                final = _parse_status(event.data)
    except KeyboardInterrupt:
        ctx.note(
            f"Stopped following; deployment {deployment_id} goes on. "
            f"To cancel it: {PROG} cancel {deployment_id}"
        )
        return EXIT_INTERRUPTED
    finally:
        ctx.status.clear()

    if final is None:
        raise DeploydError(
            0, "stream_ended", "the event stream ended before the deployment did"
        )
    if ctx.json:
        ctx.dump(final)
    return result_code(str(final.get("status")))


def _parse_status(data: str) -> dict[str, Any]:
    try:
        deployment = json.loads(data)
    except ValueError:
        deployment = None
    if not isinstance(deployment, dict) or "status" not in deployment:
        raise DeploydError(
            0, "bad_answer", "the status event does not hold a deployment"
        )
    return deployment


# Commands.


def _deployment_path(deployment_id: str, *rest: str) -> str:
    return "/".join([f"/api/admin/deploy/{path_part(deployment_id)}", *rest])


def _started(ctx: Context, answer: dict[str, Any], no_wait: bool) -> int:
    """After a deployment was started: print its id, or follow it to its end."""
    deployment_id = str(answer.get("id"))
    if no_wait:
        if ctx.json:
            ctx.dump(answer)
        else:
            ctx.line(deployment_id)
        return EXIT_OK

    if not ctx.json:
        ctx.note(f"{answer.get('message', 'Deployment started')}: {deployment_id}")
    return follow_deployment(
        ctx, deployment_id, str(answer.get("target")), answer.get("started_at")
    )


def cmd_deploy(ctx: Context) -> int:
    body = {"target": ctx.args.target}
    if ctx.args.ref is not None:
        body["ref"] = ctx.args.ref

    answer = ctx.client.post("/api/admin/deploy", body)

    return _started(ctx, answer, ctx.args.no_wait)


def cmd_rollback(ctx: Context) -> int:
    target = ctx.args.target
    newest = ctx.client.get("/api/admin/deploys", {"target": target, "limit": 1})
    deploys = newest.get("deploys") or []
    if not deploys:
        raise DeploydError(
            0, "no_deployment", f"no deployment of {target!r} to roll back"
        )

    answer = ctx.client.post(_deployment_path(deploys[0]["id"], "rollback"))

    return _started(ctx, answer, ctx.args.no_wait)


DETAIL_FIELDS = (
    "id",
    "target",
    "status",
    "started_at",
    "finished_at",
    "revision_before",
    "revision",
    "reason",
)
OPTIONAL_FIELDS = (
    "phase",
    "ref",
    "exit_status",
    "failed_step",
    "rollback_of",
    "rolled_back_by",
    "unit",
)


def cmd_status(ctx: Context) -> int:
    deployment = ctx.client.get(_deployment_path(ctx.args.id))

    if ctx.json:
        ctx.dump(deployment)
        return EXIT_OK
    pairs = [(name, shown(deployment.get(name))) for name in DETAIL_FIELDS]
    pairs += [
        (name, shown(deployment[name]))
        for name in OPTIONAL_FIELDS
        if deployment.get(name) is not None
    ]
    # Only the values are painted: the names alone set the alignment.
    pairs = [
        (name, paint(value, DEPLOY_COLOURS.get(value), ctx.colour))
        if name == "status"
        else (name, value)
        for name, value in pairs
    ]
    ctx.lines(format_fields(pairs))
    return EXIT_OK


def cmd_output(ctx: Context) -> int:
    if ctx.args.follow:
        deployment = ctx.client.get(_deployment_path(ctx.args.id))
        return follow_deployment(
            ctx,
            str(deployment["id"]),
            str(deployment.get("target")),
            deployment.get("started_at"),
        )

    text = ctx.client.text(_deployment_path(ctx.args.id, "log"))

    if ctx.json:
        ctx.dump(text)
    else:
        ctx.status.clear()
        ctx.out.write(text)
        ctx.out.flush()
    return EXIT_OK


LIST_HEADERS = (
    "ID",
    "TARGET",
    "STATUS",
    "STARTED",
    "FINISHED",
    "BEFORE",
    "REVISION",
    "REASON",
)


def cmd_list(ctx: Context) -> int:
    query = {
        "target": ctx.args.target,
        "status": ctx.args.status,
        "limit": ctx.args.limit,
    }

    answer = ctx.client.get("/api/admin/deploys", query)

    if ctx.json:
        ctx.dump(answer)
        return EXIT_OK
    deploys = answer.get("deploys") or []
    if not deploys:
        ctx.note("No deployments.")
        return EXIT_OK
    rows = [
        [
            shown(d.get("id")),
            shown(d.get("target")),
            shown(d.get("status")),
            shown(d.get("started_at")),
            shown(d.get("finished_at")),
            short_revision(d.get("revision_before")),
            short_revision(d.get("revision")),
            shown(d.get("reason")),
        ]
        for d in deploys
    ]
    ctx.lines(
        format_table(
            LIST_HEADERS,
            rows,
            lambda column, text: DEPLOY_COLOURS.get(text) if column == 2 else None,
            ctx.colour,
        )
    )
    return EXIT_OK


def cmd_cancel(ctx: Context) -> int:
    deployment = ctx.client.post(_deployment_path(ctx.args.id, "cancel"))

    if ctx.json:
        ctx.dump(deployment)
    else:
        status = str(deployment.get("status"))
        ctx.line(
            f"Deployment {deployment.get('id')} of {deployment.get('target')}: "
            + paint(status, DEPLOY_COLOURS.get(status), ctx.colour)
        )
    return EXIT_OK


SERVICE_HEADERS = ("NAME", "STATUS", "PID", "PORT", "HEALTH", "UNIT", "SINCE")


def _service_colour(column: int, text: str) -> str | None:
    if column == 1:
        return SERVICE_COLOURS.get(text)
    if column == 4:
        return HEALTH_COLOURS.get(text)
    return None


def cmd_services(ctx: Context) -> int:
    services = ctx.client.get("/api/admin/services")

    if ctx.json:
        ctx.dump(services)
        return EXIT_OK
    if not services:
        ctx.note("No services configured.")
        return EXIT_OK
    rows = [
        [
            name,
            shown(view.get("status")),
            shown(view.get("pid")),
            shown(view.get("port")),
            shown(view.get("health")),
            shown(view.get("unit")),
            shown(view.get("since")),
        ]
        for name, view in services.items()
    ]
    ctx.lines(format_table(SERVICE_HEADERS, rows, _service_colour, ctx.colour))
    return EXIT_OK


def cmd_logs(ctx: Context) -> int:
    name = ctx.args.service
    path = f"/api/admin/services/{path_part(name)}/logs"
    if not ctx.args.follow:
        answer = ctx.client.get(path, {"lines": ctx.args.lines})
        if ctx.json:
            ctx.dump(answer)
        else:
            ctx.lines(answer.get("lines") or [])
        return EXIT_OK

    since = time.time()
    events = ctx.client.events(path, {"lines": ctx.args.lines, "follow": 1})
    try:
        for event in _pump(
            ctx, events, lambda: f"{name}: following {elapsed_since(None, since)}"
        ):
            if event.type != "line":
                continue
            if ctx.json:
                ctx.dump({"cursor": event.id, "line": event.data}, indent=None)
            else:
                ctx.line(event.data)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    finally:
        ctx.status.clear()
    return EXIT_OK


def cmd_restart(ctx: Context) -> int:
    name = ctx.args.service

    view = ctx.client.post(
        f"/api/admin/services/{path_part(name)}/restart", timeout=CONTROL_TIMEOUT
    )

    if ctx.json:
        ctx.dump(view)
    else:
        status = str(view.get("status"))
        ctx.line(
            f"Restarted {name} ({view.get('unit')}): "
            + paint(status, SERVICE_COLOURS.get(status), ctx.colour)
            + f", pid {shown(view.get('pid'))}"
        )
    return EXIT_OK


# The command line.


class Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one ``Error:`` line, exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"Error: {message} (see {self.prog} --help)\n")


def _count(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(text)


def _add_connection_options(parser: argparse.ArgumentParser, top: bool) -> None:
    """The options every command takes, before or after its name.

    Below a command they default to nothing at all, so that an option given
    before the command name is not overwritten.
    """
    unset = None if top else argparse.SUPPRESS
    group = parser.add_argument_group("connection and output")
    group.add_argument(
        "--url", default=unset, help=f"the API, e.g. {DEFAULT_URL} (${URL_ENV})"
    )
    group.add_argument(
        "--secret-file",
        metavar="PATH",
        default=unset,
        help=f"file holding the admin secret (else ${SECRET_ENV})",
    )
    group.add_argument(
        "--config",
        metavar="PATH",
        default=unset,
        help="the daemon's configuration, to find listen and the secret file",
    )
    group.add_argument(
        "--json",
        action="store_true",
        default=False if top else argparse.SUPPRESS,
        help="print what the API answered, as JSON",
    )


def build_parser() -> Parser:
    """The whole command line: options, commands and their arguments."""
    parser = Parser(
        prog=PROG,
        description="Deploy, follow and inspect deployments and services\n"
        "through the ares-deployd API.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=__version__)
    _add_connection_options(parser, top=True)
    commands = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=Parser
    )

    def command(
        name: str, run: Callable[[Context], int], summary: str, about: str
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            help=summary,
            description=about,
            epilog="Exit status: 0 success, 1 the deployment failed or was "
            "cancelled, 2 a usage error, 3 an error from or reaching the API.",
        )
        sub.set_defaults(run=run)
        _add_connection_options(sub, top=False)
        return sub

    deploy = command(
        "deploy",
        cmd_deploy,
        "start a deployment and follow its output",
        "Start a deployment of TARGET and print its output as it is written; "
        "exit 0 if it succeeds, 1 if it fails or is cancelled.",
    )
    deploy.add_argument("target", metavar="TARGET", help="a configured target")
    deploy.add_argument("--ref", help="what to deploy, handed to the steps")
    deploy.add_argument(
        "--no-wait", action="store_true", help="print the id and return at once"
    )

    status = command(
        "status",
        cmd_status,
        "show a deployment",
        "Show a deployment: its status, times, revisions and reason.",
    )
    status.add_argument("id", metavar="ID", help="the deployment's id")

    output = command(
        "output",
        cmd_output,
        "print a deployment's output",
        "Print the whole output of a deployment. With -f, follow it until the "
        "deployment ends and exit with its result.",
    )
    output.add_argument("id", metavar="ID", help="the deployment's id")
    output.add_argument(
        "-f", "--follow", action="store_true", help="follow it until it ends"
    )

    listing = command(
        "list",
        cmd_list,
        "list deployments, newest first",
        "List deployments, newest first (20 unless --limit says otherwise).",
    )
    listing.add_argument("--target", metavar="T", help="only this target's")
    listing.add_argument(
        "--status",
        metavar="S",
        choices=("running", "success", "failed", "cancelled"),
        help="only those with this status: running, success, failed, cancelled",
    )
    listing.add_argument(
        "--limit", metavar="N", type=_count, help="at most N (the API allows 200)"
    )

    cancel = command(
        "cancel", cmd_cancel, "cancel a running deployment", "Stop a deployment."
    )
    cancel.add_argument("id", metavar="ID", help="the deployment's id")

    command(
        "services",
        cmd_services,
        "show the services and their state",
        "Show every configured service: status, PID, port, health, unit.",
    )

    logs = command(
        "logs",
        cmd_logs,
        "print a service's journal",
        "Print a service's journal lines, as journalctl prints them. With -f, "
        "go on printing new lines until interrupted.",
    )
    logs.add_argument("service", metavar="SERVICE", help="a configured service")
    logs.add_argument(
        "-n",
        "--lines",
        metavar="N",
        type=_count,
        help="the last N lines (default 100, or 10 with -f)",
    )
    logs.add_argument(
        "-f", "--follow", action="store_true", help="print new lines as they come"
    )

    restart = command(
        "restart",
        cmd_restart,
        "restart a service",
        "Restart a service's unit and wait until systemd's job has ended.",
    )
    restart.add_argument("service", metavar="SERVICE", help="a configured service")

    rollback = command(
        "rollback",
        cmd_rollback,
        "roll a target back and follow it",
        "Deploy again the revision that was live before TARGET's newest "
        "deployment, and follow it like deploy.",
    )
    rollback.add_argument("target", metavar="TARGET", help="a configured target")
    rollback.add_argument(
        "--no-wait", action="store_true", help="print the id and return at once"
    )

    return parser


def _one_line(text: str) -> str:
    return "; ".join(part.strip() for part in text.splitlines() if part.strip())


def _silence_stdout() -> None:
    # Nothing reads standard output any more; closing it later must not fail.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; the exit status, as the epilog of ``--help`` lists them."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="replace")
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else EXIT_OK

    ctx = Context(
        args=args,
        out=sys.stdout,
        err=sys.stderr,
        colour=colour_enabled(sys.stdout, os.environ),
        status=StatusLine(sys.stderr, sys.stderr.isatty()),
    )
    try:
        return args.run(ctx)
    except DeploydError as error:
        ctx.note(f"Error: {_one_line(error.message)}")
        return EXIT_ERROR
    except KeyboardInterrupt:
        ctx.status.clear()
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except Exception as error:  # the promise is: never a traceback
        ctx.note(f"Error: unexpected {type(error).__name__}: {_one_line(str(error))}")
        return EXIT_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
