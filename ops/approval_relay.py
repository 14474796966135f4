"""The approval relay: MLflow's registry webhook in, an Airflow asset event out.

    python -m ops.approval_relay --port 8090 --secret-file S --state-dir D

MLflow calls POST /mlflow-webhook on every `model_version_tag.set` (registered by
`register_webhook`, signed with the shared secret S: HMAC-SHA256 over
"<delivery id>.<timestamp>.<body>", header X-MLflow-Signature "v1,<base64>"). When the tag is
`approval`, the relay posts the Airflow asset event MODEL_APPROVED, which triggers the promote
DAG at once (its slow schedule stays as the safety net). The event is only a wake-up call: the
promote DAG trusts nothing in it and re-reads the registry and the state records itself.
Unsigned, badly signed or stale (more than 5 minutes) deliveries are refused with 401; a delivery
id already relayed is answered and dropped (MLflow retries and replays post nothing twice).
Loopback only, bounded like the inference server (onerec.serve.guard, the same code): headers within
5 s and 64 KiB, a body within 10 s and 64 KiB (Content-Length checked before reading), at most 64
connections and 32 requests in flight.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import logging
import sys
import time
from pathlib import Path

from onerec.errors import UserError
from onerec.settings import Settings
from ops.airflow_events import MODEL_APPROVED, notify
from ops.mlflow_auth import read_private

log = logging.getLogger("onerec.approval_relay")

MAX_BODY = 64 << 10
MAX_SKEW_S = 300
LIMITS = {"header_timeout_s": 5.0, "max_header_bytes": 64 << 10, "max_connections": 64, "keep_alive_s": 5.0}
BODY_TIMEOUT_S = 10.0
MAX_IN_FLIGHT = 32
WEBHOOK_NAME = "onerec-approval-relay"


def signature(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    signed = f"{delivery_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(secret.encode(), signed, hashlib.sha256).digest()).decode()


def create_relay_app(secret: str, settings: Settings, post_event=None):
    from starlette.applications import Starlette  # heavy: Starlette
    from starlette.middleware import Middleware  # heavy: Starlette
    from starlette.requests import Request  # heavy: Starlette
    from starlette.responses import JSONResponse  # heavy: Starlette
    from starlette.routing import Route  # heavy: Starlette

    from onerec.serve.guard import RequestGuard, read_body  # heavy: numpy, FastAPI

    post_event = post_event or (lambda extra: notify(MODEL_APPROVED, extra, settings))
    relayed: dict[str, float] = {}  # delivery id -> when it was relayed; kept while it could be fresh

    async def webhook(request: Request):
        body = await read_body(request, MAX_BODY)
        if body is None:
            return JSONResponse({"error": f"body larger than {MAX_BODY} bytes"}, status_code=413)
        delivery = request.headers.get("x-mlflow-delivery-id", "")
        stamp = request.headers.get("x-mlflow-timestamp", "")
        given = request.headers.get("x-mlflow-signature", "")
        fresh = stamp.isdigit() and abs(time.time() - int(stamp)) <= MAX_SKEW_S
        if not (fresh and hmac.compare_digest(given, signature(secret, delivery, stamp, body))):
            log.warning("refused a webhook delivery with a missing, bad or stale signature")
            return JSONResponse({"error": "bad signature"}, status_code=401)
        try:
            payload = json.loads(body)
            data = payload.get("data") or {}
        except (json.JSONDecodeError, AttributeError):
            return JSONResponse({"error": "not a webhook payload"}, status_code=400)
        if (payload.get("entity"), payload.get("action")) != ("model_version_tag", "set") or data.get("key") != "approval":
            return JSONResponse({"relayed": False})
        now = time.time()
        for seen in [d for d, at in relayed.items() if now - at > 2 * MAX_SKEW_S]:
            del relayed[seen]  # its signed timestamp is stale by now: refused above anyway
        if delivery in relayed:
            log.info("delivery %s was relayed already: dropped", delivery)
            return JSONResponse({"relayed": False, "duplicate": True})
        extra = {"name": str(data.get("name")), "version": str(data.get("version")), "delivery_id": delivery}
        log.info("approval tag set on %s version %s: waking the promote DAG", extra["name"], extra["version"])
        posted = post_event(extra) is not None
        if posted:  # a delivery that failed to post may come again (MLflow retries) and is relayed then
            relayed[delivery] = now
        return JSONResponse({"relayed": posted})

    async def health(request: Request):
        return JSONResponse({"ok": True})

    return Starlette(routes=[Route("/mlflow-webhook", webhook, methods=["POST"]),
                             Route("/health", health, methods=["GET"])],
                     middleware=[Middleware(RequestGuard, metrics=None, body_timeout_s=BODY_TIMEOUT_S,
                                            max_in_flight=MAX_IN_FLIGHT)])


def register_webhook(mlflow_url: str, admin: tuple[str, str], relay_url: str, secret: str,
                     id_file: Path | None = None) -> str:
    """Create (or replace) the registry webhook that calls the relay on every version tag set.

    The id of the webhook created is kept in `id_file`, and that webhook is deleted by id first:
    deleting needs no decryption of its secret, so a webhook that MLflow can no longer read (its
    encryption key changed) is still replaced."""
    import httpx  # heavy: httpx, only where HTTP is spoken

    with httpx.Client(base_url=mlflow_url, auth=admin, timeout=30, trust_env=False) as http:
        if id_file is not None and id_file.is_file() and (known := id_file.read_text().strip()):
            gone = http.delete(f"/api/2.0/mlflow/webhooks/{known}")
            if gone.status_code not in (200, 404):
                gone.raise_for_status()
        listed = http.get("/api/2.0/mlflow/webhooks")
        if listed.status_code != 200:
            raise UserError(f"MLflow at {mlflow_url} cannot list its webhooks (HTTP {listed.status_code}): a webhook "
                            "stored under another encryption key? See MLflow's log")
        for hook in listed.json().get("webhooks", []):
            if hook.get("name") == WEBHOOK_NAME:
                http.delete(f"/api/2.0/mlflow/webhooks/{hook['webhook_id']}").raise_for_status()
        created = http.post("/api/2.0/mlflow/webhooks", json={
            "name": WEBHOOK_NAME, "url": f"{relay_url}/mlflow-webhook", "secret": secret, "status": "ACTIVE",
            "events": [{"entity": "MODEL_VERSION_TAG", "action": "SET"}],
        })
        created.raise_for_status()
        webhook_id = created.json()["webhook"]["webhook_id"]
    if id_file is not None:
        id_file.parent.mkdir(parents=True, exist_ok=True)
        id_file.write_text(webhook_id + "\n")
    return webhook_id


def main(argv: list[str] | None = None) -> int:
    import uvicorn  # heavy: uvicorn

    parser = argparse.ArgumentParser(prog="python -m ops.approval_relay", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--secret-file", type=Path, required=True, help="0600 file with the webhook secret")
    parser.add_argument("--state-dir", default=None, help="the local stack's state dir (Airflow URL and login)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        secret = read_private(args.secret_file, "webhook secret", 16)
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    from onerec.serve.guard import guarded_config  # heavy: numpy, FastAPI

    # the relay's configuration, built here once: the Airflow to post to (or the stack's, in its state dir)
    settings = Settings.from_env(overrides={"state_dir": args.state_dir} if args.state_dir else None)
    config = guarded_config(create_relay_app(secret, settings), "127.0.0.1", args.port, **LIMITS,
                            access_log=False, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
