"""The one error type of ares-deployd.

Every failure a caller can see carries a stable machine code (``snake_case``), one
human sentence and the HTTP status it maps to. The API turns it into a JSON body
in one place, the command-line tools into an ``Error: ...`` line in another.
"""

from __future__ import annotations

from typing import Any


class DeploydError(Exception):
    """A failure with a stable ``code``, a human ``message`` and an HTTP ``status``.

    ``extra`` holds further JSON fields for the error body, such as the id of the
    deployment that made a request conflict.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.extra = extra

    def to_json(self) -> dict[str, Any]:
        """The body of the error answer: ``error``, ``message`` and any extras."""
        return {"error": self.code, "message": self.message, **self.extra}


def bad_request(code: str, message: str, **extra: Any) -> DeploydError:
    return DeploydError(400, code, message, **extra)


def not_found(code: str, message: str, **extra: Any) -> DeploydError:
    return DeploydError(404, code, message, **extra)


def conflict(code: str, message: str, **extra: Any) -> DeploydError:
    return DeploydError(409, code, message, **extra)
