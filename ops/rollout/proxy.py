"""The stable local endpoint: a tiny HTTP reverse proxy whose upstream the local rollout switches.

    python -m ops.rollout.proxy --port 8800 --state-file .onerec/serving/proxy-upstream.json

Every request is forwarded on its own (HTTP level, not TCP), so switching the upstream takes
effect for the very next request, even on a client's kept-alive connection; a request already
forwarded finishes on the old server, which drains before it stops. The switch is one assignment
(atomic for the event loop) and is persisted to the state file, so a restarted proxy resumes it.
A connection that fails before any response byte arrived (an upstream just closing an idle
keep-alive connection at shutdown) is retried on the current upstream: the served endpoints are
idempotent (a recommendation is a pure function of the request), so a retry is safe.

Bounded like the inference server it fronts (onerec.serve.guard, the same code): headers within
5 s and 64 KiB, a body within 10 s of its headers and 8 MiB (Content-Length checked before reading),
at most 1024 connections and 256 requests in flight (beyond: 503 + Retry-After; health checks
exempt), an upstream answer of at most 16 MiB (else 502). Requests are not logged one by one.

Admin (loopback only, as the proxy itself): PUT /_proxy/upstream {"url": "http://127.0.0.1:N"} with
`Authorization: Bearer <token>`, the token read from --token-file (which must be 0600; anything
else is refused with 401 and changes nothing); GET /_proxy/status (read-only, no token).
No torch import: it starts in well under a second.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import os
import sys
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

from ops.mlflow_auth import read_private

log = logging.getLogger("ops.rollout.proxy")

HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "host", "content-length",
}
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
MAX_BODY = 8 << 20
MAX_RESPONSE = 16 << 20
MAX_ADMIN_BODY = 4 << 10
RETRIES = 5
# the inference server's defaults (onerec.serve.app.ServerConfig)
LIMITS = {"header_timeout_s": 5.0, "max_header_bytes": 64 << 10, "max_connections": 1024, "keep_alive_s": 75.0}
BODY_TIMEOUT_S = 10.0
MAX_IN_FLIGHT = 256
GRACEFUL_S = 10.0  # for requests still running at a stop



def check_upstream(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname not in LOOPBACK_HOSTS or parts.port is None:
        raise ValueError(f"upstream must be http://<loopback>:<port>, not {url!r}")
    return f"http://{parts.hostname}:{parts.port}"


def read_token(path: Path) -> str:
    """The admin token from a file only its owner can read."""
    return read_private(path, "admin token", 16)


def create_proxy_app(state_file: Path, token: str):
    import httpx  # heavy: httpx, only where HTTP is spoken
    from starlette.applications import Starlette  # heavy: Starlette
    from starlette.middleware import Middleware  # heavy: Starlette
    from starlette.requests import Request  # heavy: Starlette
    from starlette.responses import JSONResponse, Response  # heavy: Starlette
    from starlette.routing import Route  # heavy: Starlette

    from onerec.serve.guard import RequestGuard, read_body, read_capped  # heavy: numpy, FastAPI

    state = {"upstream": None, "switches": 0}
    if state_file.is_file():
        try:
            state["upstream"] = check_upstream(json.loads(state_file.read_text())["upstream"])
        except (ValueError, KeyError, TypeError, json.JSONDecodeError):
            log.warning("ignoring unreadable %s", state_file)
    client = httpx.AsyncClient(timeout=httpx.Timeout(60.0, connect=2.0), limits=httpx.Limits(max_keepalive_connections=64))

    def persist(upstream: str) -> None:
        tmp = state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"upstream": upstream}) + "\n")
        os.replace(tmp, state_file)

    async def set_upstream(request: Request):
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            log.warning("refused an upstream switch without the admin token")
            return JSONResponse({"error": "the upstream switch needs the admin token"}, status_code=401)
        body = await read_body(request, MAX_ADMIN_BODY)
        if body is None:
            return JSONResponse({"error": "body too large"}, status_code=413)
        try:
            url = check_upstream(json.loads(body)["url"])
        except (ValueError, KeyError, TypeError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        persist(url)
        previous, state["upstream"] = state["upstream"], url
        state["switches"] += 1
        log.info("upstream %s -> %s", previous, url)
        return JSONResponse({"upstream": url, "previous": previous})

    async def status(request: Request):
        return JSONResponse({"upstream": state["upstream"], "switches": state["switches"], "pid": os.getpid()})

    async def forward(request: Request):
        body = await read_body(request, MAX_BODY)
        if body is None:
            return JSONResponse({"error": f"body larger than {MAX_BODY} bytes"}, status_code=413)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        last_error = None
        for attempt in range(RETRIES):
            upstream = state["upstream"]
            if upstream is None:
                return JSONResponse({"error": "no upstream server deployed yet"}, status_code=503)
            url = upstream + request.url.path + (f"?{request.url.query}" if request.url.query else "")
            try:
                async with client.stream(request.method, url, content=body, headers=headers) as reply:
                    content = await read_capped(reply.aiter_bytes(), MAX_RESPONSE)
            except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
                last_error = exc
                await asyncio.sleep(0.05 * (attempt + 1))
                continue
            if content is None:
                log.warning("%s %s: the upstream answer exceeds %d bytes", request.method, request.url.path, MAX_RESPONSE)
                return JSONResponse({"error": f"upstream answer larger than {MAX_RESPONSE} bytes"}, status_code=502)
            out_headers = {k: v for k, v in reply.headers.items() if k.lower() not in HOP_BY_HOP | {"content-encoding"}}
            return Response(content, status_code=reply.status_code, headers=out_headers)
        return JSONResponse({"error": f"upstream unreachable: {last_error!r}"}, status_code=502)

    @asynccontextmanager
    async def lifespan(app):
        yield
        await client.aclose()

    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
    app = Starlette(
        routes=[
            Route("/_proxy/upstream", set_upstream, methods=["PUT"]),
            Route("/_proxy/status", status, methods=["GET"]),
            Route("/{path:path}", forward, methods=methods),
        ],
        lifespan=lifespan,
        middleware=[Middleware(RequestGuard, metrics=None, body_timeout_s=BODY_TIMEOUT_S, max_in_flight=MAX_IN_FLIGHT)],
    )
    return app


def main(argv: list[str] | None = None) -> int:
    import uvicorn  # heavy: uvicorn

    parser = argparse.ArgumentParser(prog="python -m ops.rollout.proxy", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1", choices=sorted(LOOPBACK_HOSTS))
    parser.add_argument("--state-file", type=Path, required=True)
    parser.add_argument("--token-file", type=Path, required=True, help="0600 file with the admin token")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # its INFO line per forwarded request
    args.state_file.parent.mkdir(parents=True, exist_ok=True)
    from onerec.serve.guard import guarded_config  # heavy: numpy, FastAPI
    from onerec.serve.server import _log_config  # heavy: numpy, FastAPI

    try:
        token = read_token(args.token_file)
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    config = guarded_config(create_proxy_app(args.state_file, token), args.host, args.port, **LIMITS,
                            log_config=_log_config(), access_log=False, timeout_graceful_shutdown=GRACEFUL_S)
    uvicorn.Server(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
