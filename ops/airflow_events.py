"""Asset events through Airflow's REST API: how the outside world wakes a DAG up.

    POST /auth/token            {"username", "password"} -> {"access_token"}
    GET  /api/v2/assets?name_pattern=NAME
    POST /api/v2/assets/events  {"asset_id", "extra"}

`publish` posts CHECKPOINT_PUBLISHED (requantize starts when a checkpoint lands) and the approval
relay (ops.approval_relay) posts MODEL_APPROVED (promote starts when an approver decides).
Where Airflow is: the caller's Settings (airflow_url, airflow_username, airflow_password: in
production from a Secret), else the local stack's stack.json in settings.state_dir. Without either, nothing is posted and the DAG's
schedule picks the change up later.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from onerec.errors import UserError
from onerec.settings import Settings

log = logging.getLogger(__name__)

CHECKPOINT_PUBLISHED = "onerec_checkpoint_published"
MODEL_APPROVED = "onerec_model_approved"


def airflow_target(settings: Settings) -> dict | None:
    """{"url", "username", "password"} of the Airflow to notify, or None."""
    if settings.airflow_url:
        return {"url": settings.airflow_url.rstrip("/"), "username": settings.airflow_username,
                "password": settings.airflow_password or ""}
    try:
        state = json.loads((Path(settings.state_dir) / "stack.json").read_text())
        creds = state["credentials"]["airflow"]
        return {"url": state["services"]["airflow"]["url"], "username": creds["username"], "password": creds["password"]}
    except (OSError, KeyError, json.JSONDecodeError):
        return None


def post_asset_event(target: dict, asset_name: str, extra: dict, timeout: float = 15.0) -> dict:
    """One asset event; returns Airflow's answer. UserError when Airflow refuses or lacks the asset."""
    import httpx  # heavy: httpx, only where HTTP is spoken

    with httpx.Client(base_url=target["url"], timeout=timeout, trust_env=False) as http:
        token = http.post("/auth/token", json={"username": target["username"], "password": target["password"]})
        if token.status_code not in (200, 201):
            raise UserError(f"Airflow at {target['url']} refused the login ({token.status_code})")
        http.headers["Authorization"] = f"Bearer {token.json()['access_token']}"
        found = http.get("/api/v2/assets", params={"name_pattern": asset_name})
        found.raise_for_status()
        ids = [a["id"] for a in found.json().get("assets", []) if a.get("name") == asset_name]
        if not ids:
            raise UserError(f"Airflow at {target['url']} has no asset {asset_name} (are the onerec DAGs parsed?)")
        event = http.post("/api/v2/assets/events", json={"asset_id": ids[0], "extra": extra})
        if event.status_code not in (200, 201):
            raise UserError(f"Airflow refused the {asset_name} event ({event.status_code}: {event.text[:200]})")
        log.info("posted %s event to %s", asset_name, target["url"])
        return event.json()


def notify(asset_name: str, extra: dict, settings: Settings) -> dict | None:
    """Post the event when `settings` name an Airflow; a failure is logged, never fatal (the schedule catches up)."""
    target = airflow_target(settings)
    if target is None:
        log.info("no Airflow configured: %s not posted (the DAG's schedule will pick it up)", asset_name)
        return None
    import httpx  # heavy: httpx, only where HTTP is spoken

    try:
        return post_asset_event(target, asset_name, extra)
    except (UserError, httpx.HTTPError, OSError, ValueError, KeyError) as exc:
        # the event is a shortcut, not the only path
        log.warning("could not post %s to Airflow (%s); the DAG's schedule will pick it up", asset_name, exc)
        return None
