"""What uvicorn does not guard against, covered here.

uvicorn times out an idle keep-alive connection, but not a client that is slow to send its
request headers (a new connection that sends nothing, or a header a byte at a time), nor a
request body that stops arriving: its `receive()` waits for ever. So:

- `header_timeout_protocol` gives each connection a deadline for the headers of its next
  request, from when it opens and from the end of each response;
- `BodyGuard` (ASGI middleware) bounds the wait for every piece of a request body and for
  every piece of a response to be taken (a client that stops reading a download), and reads
  bodies other than uploads whole, at most `max_body_bytes`, before the app sees them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from watcher.api.errors import ApiError, error_response

log = structlog.get_logger()


class BodyTimeout(Exception):
    """The client stopped sending its request body."""


class SendTimeout(Exception):
    """The client stopped taking its response."""


def body_timeout_error(seconds: float) -> ApiError:
    return ApiError(408, f"The request body stalled for {seconds:g} s.", code="request_timeout")


def header_timeout_protocol(base: type, seconds: float) -> type:
    """A subclass of uvicorn's HTTP protocol class `base` that closes a connection whose next
    request headers are not complete `seconds` after it opened or after its last response."""

    class HeaderDeadline(base):  # type: ignore[misc, valid-type]
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm_header_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_header_deadline()

        def _arm_header_deadline(self) -> None:
            waiting_for = self.cycle  # the request before the one whose headers are due
            self.loop.call_later(seconds, self._header_deadline, waiting_for)

        def _header_deadline(self, waiting_for: object) -> None:
            idle = self.cycle is None or self.cycle.response_complete
            if self.cycle is waiting_for and idle and not self.transport.is_closing():
                self.transport.close()

    HeaderDeadline.__name__ = f"HeaderDeadline{base.__name__}"
    return HeaderDeadline


def _timed(receive: Receive, seconds: float) -> Callable[[], Awaitable[Message]]:
    async def timed_receive() -> Message:
        try:
            return await asyncio.wait_for(receive(), seconds)
        except asyncio.TimeoutError:
            raise BodyTimeout from None

    return timed_receive


def _timed_send(send: Send, seconds: float) -> Send:
    async def timed_send(message: Message) -> None:
        try:
            await asyncio.wait_for(send(message), seconds)
        except asyncio.TimeoutError:
            raise SendTimeout from None

    return timed_send


def _caused_by_stall(error: BaseException) -> bool:
    """A SendTimeout, also inside the exception groups of the task groups it crossed."""
    if isinstance(error, SendTimeout):
        return True
    return any(_caused_by_stall(inner) for inner in getattr(error, "exceptions", ()))


class BodyGuard:
    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        idle_seconds: float,
        streamed: Callable[[str, str], bool],
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.idle_seconds = idle_seconds
        self.streamed = streamed  # (method, path) -> whether the app reads the body itself

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            await self._guarded(scope, receive, _timed_send(send, self.idle_seconds))
        except Exception as error:
            if not _caused_by_stall(error):
                raise
            # Ending here without the whole response makes uvicorn close the connection.
            log.warning("api_client_stalled", path=scope["path"], seconds=self.idle_seconds)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        timed = _timed(receive, self.idle_seconds)
        if self.streamed(scope["method"], scope["path"]):
            await self.app(scope, timed, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await self._refuse(scope, send, self._too_large())
            return
        try:
            body = await asyncio.wait_for(self._read(receive), self.idle_seconds)
        except asyncio.TimeoutError:
            await self._refuse(scope, send, body_timeout_error(self.idle_seconds))
            return
        if body is None:
            return  # the client went away
        if len(body) > self.max_body_bytes:
            await self._refuse(scope, send, self._too_large())
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read(self, receive: Receive) -> bytes | None:
        """The whole body, or as much as shows it is too large; None on a disconnect."""
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes or not message.get("more_body", False):
                return bytes(body)

    def _too_large(self) -> ApiError:
        return ApiError(
            413,
            f"The request body is larger than {self.max_body_bytes} bytes.",
            code="request_too_large",
        )

    async def _refuse(self, scope: Scope, send: Send, error: ApiError) -> None:
        response = error_response(error)
        response.headers["connection"] = "close"
        await response(scope, _no_body, send)


async def _no_body() -> Message:
    return {"type": "http.disconnect"}


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # only a disconnect can come now

    return replay
