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

Canary: PUT /_proxy/canary {"url": "http://127.0.0.1:M", "weight": 5, "version": "7", "mirror": true}
sends that percentage of the recommendation requests (POST /v1/recommend and the Open Inference
/v2/models/<name>/infer) to the canary server beside the upstream, mirrors the upstream's share to
it when `mirror` is set (the canary's mirrored answers are compared, never returned) and keeps
both arms' evidence (ops/rollout/canary.py), reset by each PUT; {"url": null} ends it (everything
to the upstream again). Health, metadata and every other path always go to the upstream. The
canary lives in memory only: a restarted proxy sends everything to the upstream. At most
MIRROR_IN_FLIGHT mirrored requests run at once; beyond, a mirror is dropped (counted).

Admin (loopback only, as the proxy itself): PUT /_proxy/upstream {"url": "http://127.0.0.1:N"} and
PUT /_proxy/canary with `Authorization: Bearer <token>`, the token read from --token-file (which
must be 0600; anything else is refused with 401 and changes nothing); GET /_proxy/status
(read-only, no token: the upstream, and the canary with its evidence so far).
No torch import: it starts in well under a second.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import os
import random
import sys
import time
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
MIRROR_IN_FLIGHT = 32



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
    from ops.rollout.canary import CanaryStats, is_recommendation

    state = {"upstream": None, "switches": 0, "canary": None}
    if state_file.is_file():
        try:
            state["upstream"] = check_upstream(json.loads(state_file.read_text())["upstream"])
        except (ValueError, KeyError, TypeError, json.JSONDecodeError):
            log.warning("ignoring unreadable %s", state_file)
    client = httpx.AsyncClient(timeout=httpx.Timeout(60.0, connect=2.0), limits=httpx.Limits(max_keepalive_connections=64))
    mirrors: set[asyncio.Task] = set()

    def persist(upstream: str) -> None:
        tmp = state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"upstream": upstream}) + "\n")
        os.replace(tmp, state_file)

    async def admin_body(request: Request, what: str) -> dict | JSONResponse:
        """The JSON object of an admin call that carries the token, or the 401/413/400 answer."""

        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            log.warning("refused %s without the admin token", what)
            return JSONResponse({"error": f"{what} needs the admin token"}, status_code=401)
        body = await read_body(request, MAX_ADMIN_BODY)
        if body is None:
            return JSONResponse({"error": "body too large"}, status_code=413)
        try:
            parsed = json.loads(body)
        except ValueError as exc:
            return JSONResponse({"error": f"body is not JSON: {exc}"}, status_code=400)
        if not isinstance(parsed, dict):
            return JSONResponse({"error": "body must be a JSON object"}, status_code=400)
        return parsed

    async def set_upstream(request: Request):
        body = await admin_body(request, "the upstream switch")
        if isinstance(body, JSONResponse):
            return body
        try:
            url = check_upstream(body["url"])
        except (ValueError, KeyError, TypeError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        persist(url)
        previous, state["upstream"] = state["upstream"], url
        state["switches"] += 1
        log.info("upstream %s -> %s", previous, url)
        return JSONResponse({"upstream": url, "previous": previous})

    async def set_canary(request: Request):
        body = await admin_body(request, "the canary switch")
        if isinstance(body, JSONResponse):
            return body
        if body.get("url") is None:
            ended, state["canary"] = state["canary"], None
            if ended:
                log.info("canary %s ended: everything to the upstream", ended["url"])
            return JSONResponse({"canary": None})
        try:
            url = check_upstream(body["url"])
            weight = body.get("weight")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight <= 100:
                raise ValueError(f"weight must be a number in 0..100 (percent), not {weight!r}")
            version = str(body.get("version") or "")[:64]
            mirror = body.get("mirror", True)
            if not isinstance(mirror, bool):
                raise ValueError("mirror must be true or false")
        except (ValueError, KeyError, TypeError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        state["canary"] = {"url": url, "weight": float(weight), "version": version, "mirror": mirror,
                           "since": time.time(), "stats": CanaryStats()}
        log.info("canary %s (version %s): %.1f%% of recommendation requests, mirror %s", url, version, weight, mirror)
        return JSONResponse({"canary": canary_status()})

    def canary_status() -> dict | None:
        canary = state["canary"]
        if canary is None:
            return None
        return {**{k: canary[k] for k in ("url", "weight", "version", "mirror", "since")},
                "seconds": time.time() - canary["since"], **canary["stats"].summary()}

    async def status(request: Request):
        return JSONResponse({"upstream": state["upstream"], "switches": state["switches"], "pid": os.getpid(),
                             "canary": canary_status()})

    async def ask(pick, method: str, target: str, body: bytes, headers) -> tuple[int | None, dict, bytes | None, str]:
        """(status, headers, content, error) of the upstream `pick()` names, re-read on each retry;
        status None when it could not be reached (error says why); content None when it is too large."""
        last_error = None
        for attempt in range(RETRIES):
            upstream = pick()
            if upstream is None:
                return None, {}, None, "no upstream server deployed yet"
            try:
                async with client.stream(method, upstream + target, content=body, headers=headers) as reply:
                    content = await read_capped(reply.aiter_bytes(), MAX_RESPONSE)
                return reply.status_code, reply.headers, content, ""
            except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
                last_error = exc
                await asyncio.sleep(0.05 * (attempt + 1))
        return None, {}, None, f"upstream unreachable: {last_error!r}"

    async def mirror(canary: dict, method: str, target: str, body: bytes, headers, stable: bytes) -> None:
        code, _, content, _ = await ask(lambda: canary["url"], method, target, body, headers)
        if canary is state["canary"]:  # the step did not change meanwhile
            canary["stats"].mirror.compare(stable, content if code == 200 else None)

    async def forward(request: Request):
        body = await read_body(request, MAX_BODY)
        if body is None:
            return JSONResponse({"error": f"body larger than {MAX_BODY} bytes"}, status_code=413)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        canary = state["canary"] if is_recommendation(request.method, request.url.path) else None
        arm = "canary" if canary and random.random() * 100 < canary["weight"] else "stable"
        pick = (lambda: canary["url"]) if arm == "canary" else (lambda: state["upstream"])
        started = time.perf_counter()
        code, reply_headers, content, error = await ask(pick, request.method, target, body, headers)
        if canary is not None and canary is state["canary"]:
            canary["stats"].arms[arm].observe(code, time.perf_counter() - started, content)
            if arm == "stable" and canary["mirror"] and code == 200 and content is not None:
                if len(mirrors) >= MIRROR_IN_FLIGHT:
                    canary["stats"].mirror.dropped += 1
                else:
                    task = asyncio.create_task(mirror(canary, request.method, target, body, headers, content))
                    mirrors.add(task)
                    task.add_done_callback(mirrors.discard)
        if code is None:
            return JSONResponse({"error": error}, status_code=503 if state["upstream"] is None else 502)
        if content is None:
            log.warning("%s %s: the upstream answer exceeds %d bytes", request.method, request.url.path, MAX_RESPONSE)
            return JSONResponse({"error": f"upstream answer larger than {MAX_RESPONSE} bytes"}, status_code=502)
        out_headers = {k: v for k, v in reply_headers.items() if k.lower() not in HOP_BY_HOP | {"content-encoding"}}
        return Response(content, status_code=code, headers=out_headers)

    @asynccontextmanager
    async def lifespan(app):
        yield
        for task in list(mirrors):
            task.cancel()
        await client.aclose()

    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
    app = Starlette(
        routes=[
            Route("/_proxy/upstream", set_upstream, methods=["PUT"]),
            Route("/_proxy/canary", set_canary, methods=["PUT"]),
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
