"""Errors the front answers itself, each carrying the HTTP status it implies.

The connection code sends `error.status` as it is; nothing re-maps it.
"""

from __future__ import annotations

from http import HTTPStatus


class HTTPError(Exception):
    """A request the front refuses; `reason` goes into the body and the log."""

    status = 400

    def __init__(self, reason: str, status: int | None = None,
                 headers: list[tuple[bytes, bytes]] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        if status is not None:
            self.status = status
        self.headers = headers or []

    @property
    def phrase(self) -> str:
        return HTTPStatus(self.status).phrase


class BadRequest(HTTPError):
    status = 400


class BodyTooLarge(HTTPError):
    status = 413


class URITooLong(HTTPError):
    status = 414


class HeadTooLarge(HTTPError):
    status = 431


class NotImplementedCoding(HTTPError):
    status = 501


class Unavailable(HTTPError):
    """No worker can take the request now (queue full, deploy step, failure)."""

    status = 503

    def __init__(self, reason: str, retry_after: int = 5, page: str | None = None) -> None:
        super().__init__(reason, headers=[(b"Retry-After", str(retry_after).encode())])
        self.page = page


class GatewayError(HTTPError):
    """The worker failed the request: 502, or 504 when it ran out of time."""

    status = 502


class GatewayTimeout(GatewayError):
    """The request ran over [app] request_timeout; the worker was stopped."""

    status = 504
