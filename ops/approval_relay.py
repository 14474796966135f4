"""The approval relay: MLflow's registry webhook in, an Airflow asset event out.

    python -m ops.approval_relay --port 8090 --secret-file S --state-dir D

MLflow calls POST /mlflow-webhook on every `model_version_tag.set` (registered by
`register_webhook`, signed with the shared secret S: HMAC-SHA256 over
"<delivery id>.<timestamp>.<body>", header X-MLflow-Signature "v1,<base64>"). When the tag is
`approval`, the relay posts the Airflow asset event MODEL_APPROVED, which triggers the promote
DAG at once (its slow schedule stays as the safety net). The event is only a wake-up call: the
promote DAG trusts nothing in it and re-reads the registry and the state records itself.
Unsigned, badly signed or stale (more than 5 minutes) deliveries are refused with 401.
Loopback only; bodies are capped at 64 KiB.
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

from ops.mlflow_auth import read_private

log = logging.getLogger("onerec.approval_relay")

MAX_BODY = 64 << 10
MAX_SKEW_S = 300
WEBHOOK_NAME = "onerec-approval-relay"


def signature(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    signed = f"{delivery_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(secret.encode(), signed, hashlib.sha256).digest()).decode()


def create_relay_app(secret: str, state_dir: str | None, post_event=None):
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from ops.airflow_events import MODEL_APPROVED, notify

    post_event = post_event or (lambda extra: notify(MODEL_APPROVED, extra, state_dir))

    async def webhook(request: Request):
        body = await request.body()
        if len(body) > MAX_BODY:
            return JSONResponse({"error": "body too large"}, status_code=413)
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
        extra = {"name": str(data.get("name")), "version": str(data.get("version")), "delivery_id": delivery}
        log.info("approval tag set on %s version %s: waking the promote DAG", extra["name"], extra["version"])
        return JSONResponse({"relayed": post_event(extra) is not None})

    async def health(request: Request):
        return JSONResponse({"ok": True})

    return Starlette(routes=[Route("/mlflow-webhook", webhook, methods=["POST"]),
                             Route("/health", health, methods=["GET"])])


def register_webhook(mlflow_url: str, admin: tuple[str, str], relay_url: str, secret: str) -> str:
    """Create (or replace) the registry webhook that calls the relay on every version tag set."""
    import httpx

    with httpx.Client(base_url=mlflow_url, auth=admin, timeout=30, trust_env=False) as http:
        listed = http.get("/api/2.0/mlflow/webhooks")
        listed.raise_for_status()
        for hook in listed.json().get("webhooks", []):
            if hook.get("name") == WEBHOOK_NAME:
                http.delete(f"/api/2.0/mlflow/webhooks/{hook['webhook_id']}").raise_for_status()
        created = http.post("/api/2.0/mlflow/webhooks", json={
            "name": WEBHOOK_NAME, "url": f"{relay_url}/mlflow-webhook", "secret": secret, "status": "ACTIVE",
            "events": [{"entity": "MODEL_VERSION_TAG", "action": "SET"}],
        })
        created.raise_for_status()
        return created.json()["webhook"]["webhook_id"]


def main(argv: list[str] | None = None) -> int:
    import uvicorn

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
    uvicorn.run(create_relay_app(secret, args.state_dir), host="127.0.0.1", port=args.port, access_log=False,
                timeout_keep_alive=5, limit_concurrency=32)
    return 0


if __name__ == "__main__":
    sys.exit(main())
