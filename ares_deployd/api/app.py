"""The Falcon application: routes, authentication and the one error format.

Every error leaves as ``{"error": "<code>", "message": "<sentence>"}`` with its
HTTP status; nothing else, and never a traceback, reaches a client.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

import falcon

from ares_deployd.errors import DeploydError

log = logging.getLogger(__name__)

SECRET_HEADER = "X-Admin-Secret"
MAX_BODY = 64 * 1024
PATH_SHOWN = 200

HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    411: "length_required",
    413: "body_too_large",
    414: "uri_too_long",
    415: "unsupported_media_type",
    429: "too_many_requests",
    431: "headers_too_large",
    500: "internal_error",
    503: "unavailable",
}


class FailureLimit:
    """Counts failed attempts per client address over a sliding window."""

    def __init__(
        self,
        limit: int = 10,
        window: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        tracked: int = 10000,
    ) -> None:
        self.limit = limit
        self.window = window
        self._clock = clock
        self._tracked = tracked
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def blocked_for(self, address: str) -> float:
        """Seconds until ``address`` may try again; 0 when it may now."""
        with self._lock:
            failures = self._failures.get(address)
            if not failures:
                return 0.0
            now = self._clock()
            while failures and failures[0] <= now - self.window:
                failures.popleft()
            if len(failures) < self.limit:
                return 0.0
            return failures[0] + self.window - now

    def failed(self, address: str) -> None:
        with self._lock:
            failures = self._failures.setdefault(address, deque(maxlen=self.limit))
            failures.append(self._clock())
            self._failures.move_to_end(address)
            # Bound the memory a flood of addresses can take.
            while len(self._failures) > self._tracked:
                self._failures.popitem(last=False)


class Authentication:
    """Refuses every request that lacks the admin secret, before routing.

    An address that failed too often in the last minute is refused with 429
    whatever it sends, so the secret cannot be guessed at speed.
    """

    def __init__(self, secret: Callable[[], str], limit: FailureLimit) -> None:
        self._secret = secret
        self._limit = limit

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        address = req.remote_addr or "unknown"
        wait = self._limit.blocked_for(address)
        if wait > 0:
            raise DeploydError(
                429,
                "too_many_attempts",
                "Too many failed attempts from this address; try again later",
                headers={"Retry-After": str(math.ceil(wait))},
            )
        given = req.get_header(SECRET_HEADER) or ""
        expected = self._secret()
        if hmac.compare_digest(given.encode(), expected.encode()):
            return
        self._limit.failed(address)
        log.warning(
            "refused %s %s from %s: %s",
            req.method,
            req.path,
            address,
            "wrong admin secret" if given else "no admin secret",
        )
        raise DeploydError(
            401, "unauthorized", f"A valid {SECRET_HEADER} header is required"
        )


def _send(resp: falcon.Response, status: int, body: dict[str, Any]) -> None:
    resp.status = falcon.code_to_http_status(status)
    resp.content_type = falcon.MEDIA_JSON
    resp.text = json.dumps(body)


def _on_deployd_error(
    req: falcon.Request, resp: falcon.Response, error: DeploydError, params: Any
) -> None:
    for name, value in error.headers.items():
        resp.set_header(name, value)
    _send(resp, error.status, error.to_json())


def _on_http_error(
    req: falcon.Request, resp: falcon.Response, error: falcon.HTTPError, params: Any
) -> None:
    status = int(str(error.status).split()[0])
    for name, value in (error.headers or {}).items():
        resp.set_header(name, value)
    message = error.description or error.title or "The request failed"
    # Enough of the path to recognise it; a client may send a very long one.
    path = req.path if len(req.path) <= PATH_SHOWN else req.path[:PATH_SHOWN] + "..."
    if status == 404:
        message = f"No such resource: {path}"
    elif status == 405:
        message = f"{req.method} is not allowed on {path}"
    _send(resp, status, {"error": HTTP_CODES.get(status, "error"), "message": message})


def _on_unexpected(
    req: falcon.Request, resp: falcon.Response, error: Exception, params: Any
) -> None:
    log.error("internal error on %s %s", req.method, req.path, exc_info=error)
    _send(
        resp,
        500,
        {"error": "internal_error", "message": "The daemon hit an internal error"},
    )


def read_json(req: falcon.Request) -> dict[str, Any]:
    """The request body as a JSON object, after the size and type checks.

    Raises:
        DeploydError: ``body_too_large`` (413), ``unsupported_media_type`` (415),
            ``bad_json`` or ``not_an_object`` (400).
    """
    if req.content_length is not None and req.content_length > MAX_BODY:
        raise DeploydError(413, "body_too_large", "The body is over 64 KiB")
    media_type = (req.content_type or "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise DeploydError(
            415,
            "unsupported_media_type",
            "Send the body as JSON with Content-Type: application/json",
        )
    raw = req.bounded_stream.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise DeploydError(413, "body_too_large", "The body is over 64 KiB")
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise DeploydError(400, "bad_json", "The body is not valid JSON") from None
    if not isinstance(body, dict):
        raise DeploydError(400, "not_an_object", "The body must be a JSON object")
    return body


def create_app(
    secret: Callable[[], str],
    routes: dict[str, object],
    middleware: list[object] | None = None,
) -> falcon.App:
    """The WSGI app: ``routes`` maps URI templates to resources.

    ``middleware`` runs before authentication, so it sees refused requests too.
    """
    authentication = Authentication(secret, FailureLimit())
    app = falcon.App(middleware=[*(middleware or []), authentication])
    app.req_options.strip_url_path_trailing_slash = True
    for template, resource in routes.items():
        app.add_route(template, resource)
    app.add_error_handler(Exception, _on_unexpected)
    app.add_error_handler(falcon.HTTPError, _on_http_error)
    app.add_error_handler(DeploydError, _on_deployd_error)
    return app
