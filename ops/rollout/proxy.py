"""The stable local endpoint: a tiny HTTP reverse proxy whose upstream the local rollout switches.

    python -m ops.rollout.proxy --port 8800 --state-file .onerec/serving/proxy-upstream.json

Every request is forwarded on its own (HTTP level, not TCP), so switching the upstream takes
effect for the very next request, even on a client's kept-alive connection; a request already
forwarded finishes on the old server, which drains before it stops. The switch is one assignment
(atomic for the event loop) and is persisted to the state file, so a restarted proxy resumes it.
A connection that fails before any response byte arrived (an upstream just closing an idle
keep-alive connection at shutdown) is retried on the current upstream: the served endpoints are
idempotent (a recommendation is a pure function of the request), so a retry is safe.

Admin (loopback only, as the proxy itself): PUT /_proxy/upstream {"url": "http://127.0.0.1:N"} with
`Authorization: Bearer <token>`, the token read from --token-file (which must be 0600; anything
else is refused with 401 and changes nothing); GET /_proxy/status (read-only, no token).
No torch import: it starts in well under a second.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

log = logging.getLogger("ops.rollout.proxy")

HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "host", "content-length",
}
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
MAX_BODY = 64 << 20
RETRIES = 5


def check_upstream(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname not in LOOPBACK_HOSTS or parts.port is None:
        raise ValueError(f"upstream must be http://<loopback>:<port>, not {url!r}")
    return f"http://{parts.hostname}:{parts.port}"


def read_token(path: Path) -> str:
    """The admin token from a file only its owner can read."""
    from ops.mlflow_auth import read_private

    return read_private(path, "admin token", 16)


def create_proxy_app(state_file: Path, token: str):
    import httpx
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

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
        import hmac

        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            log.warning("refused an upstream switch without the admin token")
            return JSONResponse({"error": "the upstream switch needs the admin token"}, status_code=401)
        try:
            url = check_upstream(json.loads(await request.body())["url"])
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
        body = await request.body()
        if len(body) > MAX_BODY:
            return JSONResponse({"error": "body too large"}, status_code=413)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        last_error = None
        for attempt in range(RETRIES):
            upstream = state["upstream"]
            if upstream is None:
                return JSONResponse({"error": "no upstream server deployed yet"}, status_code=503)
            url = upstream + request.url.path + (f"?{request.url.query}" if request.url.query else "")
            try:
                reply = await client.request(request.method, url, content=body, headers=headers)
            except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
                last_error = exc
                await asyncio.sleep(0.05 * (attempt + 1))
                continue
            out_headers = {k: v for k, v in reply.headers.items() if k.lower() not in HOP_BY_HOP | {"content-encoding"}}
            return Response(reply.content, status_code=reply.status_code, headers=out_headers)
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
    )
    return app


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m ops.rollout.proxy", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1", choices=sorted(LOOPBACK_HOSTS))
    parser.add_argument("--state-file", type=Path, required=True)
    parser.add_argument("--token-file", type=Path, required=True, help="0600 file with the admin token")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.state_file.parent.mkdir(parents=True, exist_ok=True)
    from onerec.serve.server import _log_config

    try:
        token = read_token(args.token_file)
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    uvicorn.run(create_proxy_app(args.state_file, token), host=args.host, port=args.port, log_config=_log_config(),
                access_log=False, timeout_graceful_shutdown=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
