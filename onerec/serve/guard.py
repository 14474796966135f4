"""HTTP protections the server runs behind: timeouts, limits, error accounting.

uvicorn (0.54, httptools) has a keep-alive timeout but no header or body read timeout, and its own
concurrency limit answers 503 without Retry-After to every path, health checks included. So:

- `guarded_protocol` (the uvicorn HTTP protocol, connection level): a request's headers must
  arrive within `header_timeout_s` of its first byte (or of the connection opening) and within
  `max_header_bytes`, else 408/431 and the connection is closed; beyond `max_connections` open
  connections a new one is answered 503 + Retry-After and closed before anything is read.
- `RequestGuard` (ASGI, request level): the body must arrive within `body_timeout_s` of the
  headers, else 408 and the connection is closed; beyond `max_in_flight` requests being answered
  a new one gets 503 + Retry-After, except health and metrics paths, so readiness reports the
  model's state, not the load; an exception escaping a handler becomes a counted 500; a client
  that disconnects is one debug line, not an ASGI traceback. Every response is counted in the
  metrics by route and code (when the app has metrics).
- `read_body`, `read_capped`: a request body (or any byte stream) read only up to a size limit
  (a request's Content-Length checked first).
- `guarded_config`: the uvicorn.Config with the connection-level limits, for any app (the inference
  server, the local serving proxy, the approval relay).
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import time
from collections.abc import AsyncIterator, Callable

from starlette.requests import ClientDisconnect, Request

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1
REFUSAL_LOG_INTERVAL_S = 10.0
EXEMPT_PATHS = ("/v2/health/live", "/v2/health/ready", "/metrics")


def _raw_response(status: int, reason: str, message: str, retry_after: bool = False) -> bytes:
    body = json.dumps({"error": message}).encode()
    head = [f"HTTP/1.1 {status} {reason}", "content-type: application/json", f"content-length: {len(body)}",
            "connection: close"]
    if retry_after:
        head.append(f"retry-after: {RETRY_AFTER_S}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def count_response(metrics, route: str, code: int) -> None:
    """Count one response in onerec.serve.app.Metrics: by route and code, and as an error from 400."""
    metrics.responses.labels(route, str(code)).inc()
    if code >= 400:
        metrics.errors.labels(str(code)).inc()


class HeadersTooLarge(Exception):
    """A request's url and headers exceed the size limit."""


def guarded_protocol(header_timeout_s: float, max_header_bytes: int, max_connections: int,
                     keep_alive_s: float, metrics=None) -> type:
    """uvicorn's httptools HTTP protocol class with the connection-level limits of the module doc.

    One timer per connection: armed when it opens and at a request's first byte (headers due in
    `header_timeout_s`), stopped when the headers are complete (the body deadline is the ASGI
    guard's). A body still arriving after the answer was sent (e.g. a 413 before reading it) is
    read and dropped, as uvicorn does, but for at most `header_timeout_s` more. Its own answers
    (408, 431, 503) are counted in `metrics` under the route "connection".
    """
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol  # heavy: uvicorn

    warned = [-REFUSAL_LOG_INTERVAL_S]  # when the last refusal was logged
    busy = _raw_response(503, "Service Unavailable", f"server busy: more than {max_connections} connections",
                         retry_after=True)

    class GuardedHTTPProtocol(HttpToolsProtocol):
        _read_timer: asyncio.TimerHandle | None = None
        _in_headers = False
        _header_bytes = 0  # url and headers parsed so far
        _raw_header_bytes = 0  # bytes received while the headers were incomplete

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                now = time.monotonic()
                if now - warned[0] > REFUSAL_LOG_INTERVAL_S:  # a flood of connections: not a flood of lines
                    warned[0] = now
                    log.warning("refusing connections: %d open (limit %d)", len(self.connections), max_connections)
                transport.write(busy)
                transport.close()
                self.connections.discard(self)  # counts no more, though its close completes later
                if metrics is not None:
                    count_response(metrics, "connection", 503)
                return
            self._arm(header_timeout_s)

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            # httptools buffers a header until it is complete: bound what a trickled one can grow to
            if self._in_headers and self._raw_header_bytes > max_header_bytes:
                self._refuse(431, "Request Header Fields Too Large", f"headers over {max_header_bytes} bytes")
                return
            super().data_received(data)
            if self._in_headers:  # still no end of headers: all of `data` was header bytes
                self._raw_header_bytes += len(data)

        # httptools parser callbacks
        def on_url(self, url: bytes) -> None:
            self._count_header_bytes(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count_header_bytes(len(name) + len(value))
            super().on_header(name, value)

        def _count_header_bytes(self, n: int) -> None:
            self._header_bytes += n
            if self._header_bytes > max_header_bytes:
                raise HeadersTooLarge  # stops the parser: uvicorn answers with send_400_response below

        def send_400_response(self, msg: str) -> None:
            if self._header_bytes > max_header_bytes:
                self._refuse(431, "Request Header Fields Too Large", f"headers over {max_header_bytes} bytes")
            else:
                super().send_400_response(msg)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._in_headers, self._header_bytes, self._raw_header_bytes = True, 0, 0
            if self._read_timer is None:
                self._arm(header_timeout_s)

        def on_headers_complete(self) -> None:
            self._in_headers = False
            self._disarm()
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            if self.cycle is not None and self.cycle.response_complete:  # a dropped body ended: now idle
                self._arm(keep_alive_s)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.cycle is not None and self.cycle.more_body and not self.transport.is_closing():
                self._arm(header_timeout_s)  # answered before the body was read: drop the rest, in time

        def _arm(self, seconds: float) -> None:
            self._disarm()
            self._read_timer = self.loop.call_later(seconds, self._timed_out)

        def _disarm(self) -> None:
            if self._read_timer is not None:
                self._read_timer.cancel()
                self._read_timer = None

        def _timed_out(self) -> None:
            self._read_timer = None
            if self._in_headers:
                log.debug("%s: request headers not complete after %.1f s; closing", self.client, header_timeout_s)
                self._refuse(408, "Request Timeout", f"headers not complete after {header_timeout_s} s")
            elif not self.transport.is_closing():  # idle, or a dropped body still trickling
                self.transport.close()

        def _refuse(self, status: int, reason: str, message: str) -> None:
            self._disarm()
            self._in_headers = False
            if not self.transport.is_closing():
                self.transport.write(_raw_response(status, reason, message))
                self.transport.close()
                if metrics is not None:
                    count_response(metrics, "connection", status)

    return GuardedHTTPProtocol


def connection_cap(max_connections: int, reserve: int = 128) -> int:
    """`max_connections`, lowered if need be so the open-file limit keeps `reserve` descriptors for
    everything else (model files, logs, the listening socket): running out of descriptors stops
    accept() and with it the health checks. Raises the soft limit towards the hard one first."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = max_connections + reserve
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < need:
        capped = max(1, soft - reserve)
        log.warning("open-file limit %d: at most %d connections instead of %d", soft, capped, max_connections)
        return capped
    return max_connections


def guarded_config(app, host: str, port: int, *, header_timeout_s: float, max_header_bytes: int,
                   max_connections: int, keep_alive_s: float, metrics=None, **kwargs):
    """uvicorn.Config for `app` under `guarded_protocol` (connections capped by `connection_cap`)."""
    import uvicorn  # heavy: uvicorn

    protocol = guarded_protocol(header_timeout_s, max_header_bytes, connection_cap(max_connections), keep_alive_s,
                                metrics)
    return uvicorn.Config(app, host=host, port=port, http=protocol, lifespan="on", timeout_keep_alive=keep_alive_s,
                          **kwargs)


async def read_capped(chunks: AsyncIterator[bytes], limit: int) -> bytes | None:
    """The bytes of `chunks`, or None as soon as they exceed `limit` (the rest is not read)."""
    parts, size = [], 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
    return b"".join(parts)


async def read_body(request: Request, limit: int) -> bytes | None:
    """The body, or None when it exceeds `limit` bytes (checked before and while reading, never after)."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        return None
    return await read_capped(request.stream(), limit)


class BodyReadTimeout(Exception):
    """The request body did not arrive in time."""


class RequestGuard:
    """Pure ASGI middleware: see the module doc. `metrics` is onerec.serve.app.Metrics (or None: nothing
    counted); `route_of` maps a path to its metrics label."""

    def __init__(self, app, metrics, body_timeout_s: float, max_in_flight: int,
                 route_of: Callable[[str], str] = str):
        self.app = app
        self.metrics = metrics
        self.route_of = route_of
        self.body_timeout_s = body_timeout_s
        self.max_in_flight = max_in_flight
        self.in_flight = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        path = scope["path"]
        route = self.route_of(path)
        status: list[int] = []

        async def send_observed(message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        async def respond(code: int, message: str, headers: list[tuple[bytes, bytes]]) -> None:
            body = json.dumps({"error": message}).encode()
            await send_observed({"type": "http.response.start", "status": code, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers,
            ]})
            await send_observed({"type": "http.response.body", "body": body})

        counted = path not in EXEMPT_PATHS
        if counted and self.in_flight >= self.max_in_flight:
            await respond(503, f"server busy: {self.in_flight} requests in flight (limit {self.max_in_flight})",
                          [(b"retry-after", str(RETRY_AFTER_S).encode())])
            self._observe(route, 503, start)
            return
        if counted:
            self.in_flight += 1
        try:
            await self.app(scope, self._receive_with_deadline(receive), send_observed)
        except BodyReadTimeout:
            log.debug("%s %s: body not complete after %.1f s; closing", scope.get("client"), path, self.body_timeout_s)
            if not status:
                await respond(408, f"request body not complete after {self.body_timeout_s} s",
                              [(b"connection", b"close")])
        except ClientDisconnect:
            log.debug("%s %s: client disconnected before the answer", scope.get("client"), path)
            status.append(499)  # nginx's "client closed request": counted, never sent
        except asyncio.CancelledError:
            # uvicorn cancels what still runs when its graceful shutdown time is over; the request
            # ends here with one line (re-raised, uvicorn would log a traceback for each)
            log.warning("%s %s: cancelled at shutdown (graceful shutdown time exceeded)", scope["method"], path)
            status.append(499)
        except Exception:
            log.exception("%s %s failed", scope["method"], path)
            if status:  # the response had started: nothing more to send
                status.append(500)
            else:
                await respond(500, "internal server error", [])
        finally:
            if counted:
                self.in_flight -= 1
        self._observe(route, status[-1] if status else 500, start)

    def _receive_with_deadline(self, receive):
        """receive() that raises BodyReadTimeout when the body is not complete `body_timeout_s` after the headers."""
        deadline = asyncio.get_running_loop().time() + self.body_timeout_s
        body_done = False

        async def receive_body():
            nonlocal body_done
            if body_done:  # later calls wait for a disconnect: no deadline
                return await receive()
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                if remaining <= 0:
                    raise TimeoutError
                message = await asyncio.wait_for(receive(), remaining)
            except TimeoutError:
                raise BodyReadTimeout from None
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        return receive_body

    def _observe(self, route: str, code: int, start: float) -> None:
        if self.metrics is None:
            return
        self.metrics.latency.labels(route).observe(time.perf_counter() - start)
        count_response(self.metrics, route, code)
