"""An HTTP client of the ares-deployd API, on the standard library alone.

It finds the API and the admin secret from options, the environment or the
daemon's own configuration. Requests answer parsed JSON or text; every failure,
from a refused connection to an error the API answered, is raised as a
:class:`DeploydError` whose message says what went wrong in one line. Event
streams are read as server-sent events and resumed with ``Last-Event-ID`` when
the connection drops.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from ares_deployd import __version__, config
from ares_deployd.errors import DeploydError

log = logging.getLogger(__name__)

SECRET_HEADER = "X-Admin-Secret"
URL_ENV = "ARES_DEPLOYD_URL"
SECRET_ENV = "ARES_ADMIN_SECRET"
DEFAULT_URL = "http://127.0.0.1:3001"
USER_AGENT = f"ares-deployctl/{__version__}"
# The server sends a keep-alive comment every 15 s; silence for longer than
# this means the connection is gone even if no error says so.
STREAM_SILENCE = 45.0
RESUME_TRIES = 5
RESUME_DELAY_CAP = 10.0


@dataclass(frozen=True)
class Event:
    """One server-sent event: its type, its data, and the last event id seen."""

    type: str
    data: str
    id: str


class EventParser:
    """Turns the lines of a ``text/event-stream`` into events, as browsers do."""

    def __init__(self) -> None:
        self.last_id = ""
        self.retry: float | None = None
        self._type = ""
        self._data: list[str] = []

    def feed(self, line: str) -> Event | None:
        """Take one line without its line ending; the event it completes, if any."""
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None

        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._type = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self.last_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry = int(value) / 1000
        return None

    def _dispatch(self) -> Event | None:
        kind, data = self._type or "message", self._data
        self._type, self._data = "", []
        if not data:
            return None
        return Event(kind, "\n".join(data), self.last_id)


def _lines(response: http.client.HTTPResponse) -> Iterator[str]:
    """The lines of a response as they arrive, without their line endings."""
    first = True
    while raw := response.readline():
        text = raw.decode("utf-8", errors="replace")
        if first:
            text = text.removeprefix("\ufeff")
            first = False
        text = text.removesuffix("\n").removesuffix("\r")
        yield from text.split("\r")


def _one_line(text: str) -> str:
    return "; ".join(part.strip() for part in text.splitlines() if part.strip())


class Client:
    """The API at ``base_url`` (``http://host:port``, optionally with a path)."""

    def __init__(self, base_url: str, secret: str, timeout: float = 30.0) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise DeploydError(
                0, "bad_url", f"{base_url!r} is not an http:// or https:// URL"
            )
        try:
            parts.port  # noqa: B018 (reading it checks it)
        except ValueError:
            raise DeploydError(
                0, "bad_url", f"{base_url!r} has a port that is not a number"
            ) from None
        self.base_url = base_url.rstrip("/")
        self.secret = secret
        self.timeout = timeout
        self._parts = parts
        self._prefix = parts.path.rstrip("/")

    def get(self, path: str, query: Mapping[str, Any] | None = None) -> Any:
        """The JSON answer of ``GET path``."""
        return json.loads(self._call("GET", path, query) or b"null")

    def post(self, path: str, body: Any = None, *, timeout: float | None = None) -> Any:
        """The JSON answer of ``POST path``, sending ``body`` as JSON if given."""
        answer = self._call("POST", path, None, body, timeout=timeout)
        return json.loads(answer or b"null")

    def text(self, path: str, query: Mapping[str, Any] | None = None) -> str:
        """The answer of ``GET path`` as text, invalid UTF-8 replaced."""
        return self._call("GET", path, query).decode("utf-8", errors="replace")

    def events(
        self,
        path: str,
        query: Mapping[str, Any] | None = None,
        *,
        final: str | None = None,
        last_id: str = "",
    ) -> Iterator[Event]:
        """The events of the stream at ``path``, across reconnections.

        A stream that ends before an event of type ``final`` (or at all, when
        ``final`` is None) is opened again with the last event id, so no event is
        lost or repeated. The iterator ends after the ``final`` event.

        Raises:
            DeploydError: the API refused the stream, ended it with an ``error``
                event, or it could not be resumed after a few tries.
        """
        tries = 0
        while True:
            delay = 0.0
            try:
                response = self._open(
                    "GET", path, query, None, STREAM_SILENCE, last_id=last_id
                )
                try:
                    parser = EventParser()
                    parser.last_id = last_id
                    for line in _lines(response):
                        event = parser.feed(line)
                        if event is None:
                            continue
                        if event.type == "error":
                            raise _streamed_error(event.data)
                        tries = 0
                        last_id = event.id
                        yield event
                        if event.type == final:
                            return
                    gone = "the server closed the stream"
                finally:
                    response.close()
                delay = parser.retry or 0.0
            except DeploydError as error:
                if error.code not in ("unreachable", "no_answer", "too_many_streams"):
                    raise
                gone = error.message
                delay = float(error.extra.get("retry_after", 0))
            except (OSError, http.client.HTTPException) as error:
                gone = f"the stream broke: {_reason(error)}"

            tries += 1
            if tries > RESUME_TRIES:
                raise DeploydError(
                    0, "stream_lost", f"{gone}; gave up after {RESUME_TRIES} tries"
                )
            delay = min(RESUME_DELAY_CAP, max(delay, 0.25 * 2**tries))
            log.debug("resuming %s after %s in %.1fs", path, gone, delay)
            time.sleep(delay)

    def _url(self, path: str, query: Mapping[str, Any] | None) -> str:
        target = self._prefix + path
        if query:
            pairs = {key: value for key, value in query.items() if value is not None}
            if pairs:
                target += "?" + urlencode(pairs)
        return target

    def _call(
        self,
        method: str,
        path: str,
        query: Mapping[str, Any] | None,
        body: Any = None,
        *,
        timeout: float | None = None,
    ) -> bytes:
        response = self._open(method, path, query, body, timeout or self.timeout)
        try:
            return response.read()
        except (OSError, http.client.HTTPException) as error:
            raise DeploydError(
                0,
                "no_answer",
                f"{self.base_url}: the answer broke off: {_reason(error)}",
            ) from None
        finally:
            response.close()

    def _open(
        self,
        method: str,
        path: str,
        query: Mapping[str, Any] | None,
        body: Any,
        timeout: float,
        *,
        last_id: str = "",
    ) -> http.client.HTTPResponse:
        """Send one request; the response once its status is 2xx."""
        headers = {SECRET_HEADER: self.secret, "User-Agent": USER_AGENT}
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if last_id:
            headers["Last-Event-ID"] = last_id
        kind = (
            http.client.HTTPSConnection
            if self._parts.scheme == "https"
            else http.client.HTTPConnection
        )
        connection = kind(self._parts.hostname or "", self._parts.port, timeout=timeout)

        try:
            connection.request(method, self._url(path, query), payload, headers)
            response = connection.getresponse()
        except TimeoutError:
            connection.close()
            raise DeploydError(
                0, "no_answer", f"{self.base_url} did not answer within {timeout:g}s"
            ) from None
        except (OSError, http.client.HTTPException) as error:
            connection.close()
            raise DeploydError(
                0,
                "unreachable",
                f"cannot connect to {self.base_url}: {_reason(error)}",
            ) from None

        if 200 <= response.status < 300:
            return response
        try:
            raw = response.read()
        except (OSError, http.client.HTTPException):
            raw = b""
        finally:
            response.close()
        raise _answered_error(self.base_url, response, raw)


def _answered_error(
    base_url: str, response: http.client.HTTPResponse, raw: bytes
) -> DeploydError:
    """The error the API answered, with its own code and message when it gave them."""
    body = _error_body(raw)
    code = str(body.get("error") or f"http_{response.status}")
    message = body.get("message")
    if not isinstance(message, str) or not message.strip():
        message = f"{base_url} answered {response.status} {response.reason}"
    extra: dict[str, Any] = {}
    retry_after = response.getheader("Retry-After", "")
    if retry_after.isdigit():
        extra["retry_after"] = int(retry_after)
    return DeploydError(response.status, code, _one_line(message), **extra)


def _error_body(raw: bytes | str) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _streamed_error(data: str) -> DeploydError:
    """The error an ``error`` event carries, as the body of an error answer would."""
    body = _error_body(data)
    message = body.get("message")
    if not isinstance(message, str) or not message.strip():
        message = "the stream ended with an error"
    return DeploydError(0, str(body.get("error") or "stream_error"), _one_line(message))


def _reason(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return _one_line(str(error)) or type(error).__name__


def path_part(value: str) -> str:
    """``value`` made safe as one segment of a URL path."""
    return quote(value, safe="")


# Where to connect.


def url_of(listen: config.Listen) -> str:
    """The URL that reaches a daemon listening on ``listen`` from this host."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(listen.host, listen.host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{listen.port}"


def resolve_connection(
    url: str | None, secret_file: str | None, config_path: str | None
) -> tuple[str, str]:
    """The API's URL and the admin secret, from options, environment or config.

    Raises:
        DeploydError: ``no_secret`` when no secret can be found, saying how to
            give one.
    """
    url = url or os.environ.get(URL_ENV) or None
    if secret_file:
        secret: str | None = config.read_secret_file(Path(secret_file))
    else:
        secret = os.environ.get(SECRET_ENV) or None
    if url is not None and secret is not None:
        return url, secret

    loaded = None
    problem = ""
    try:
        loaded = config.load(config.resolve_path(config_path))
    except config.ConfigError as error:
        problem = error.problems[0] if error.problems else error.message
    if url is None:
        url = url_of(loaded.server.listen) if loaded else DEFAULT_URL
    if secret is not None:
        return url, secret

    if loaded is not None:
        try:
            return url, config.load_secret(loaded)
        except DeploydError as error:
            problem = error.message
    raise DeploydError(
        0,
        "no_secret",
        f"no admin secret: give --secret-file PATH or set {SECRET_ENV} "
        f"(the daemon's configuration gave none: {problem})",
    )
