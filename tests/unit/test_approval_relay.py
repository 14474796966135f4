"""The approval relay relays each signed delivery once: MLflow's retries and replays post nothing twice."""

from __future__ import annotations

import json
import time

from starlette.testclient import TestClient

from onerec.settings import Settings
from ops.approval_relay import create_relay_app, signature

SECRET = "s" * 40
BODY = json.dumps({"entity": "model_version_tag", "action": "set",
                   "data": {"key": "approval", "name": "m", "version": "3"}}).encode()


def deliver(http: TestClient, delivery_id: str):
    stamp = str(int(time.time()))
    return http.post("/mlflow-webhook", content=BODY, headers={
        "X-MLflow-Delivery-Id": delivery_id, "X-MLflow-Timestamp": stamp,
        "X-MLflow-Signature": signature(SECRET, delivery_id, stamp, BODY)})


def test_a_delivery_id_is_relayed_once():
    posted = []
    with TestClient(create_relay_app(SECRET, Settings(), post_event=lambda extra: posted.append(extra) or {"id": 1})) as http:
        answers = [deliver(http, "d-1").json() for _ in range(3)]
        assert answers[0] == {"relayed": True}
        assert answers[1] == answers[2] == {"relayed": False, "duplicate": True}
        assert deliver(http, "d-2").json() == {"relayed": True}
    assert [p["delivery_id"] for p in posted] == ["d-1", "d-2"] and posted[0]["version"] == "3"


def test_a_delivery_that_could_not_be_posted_is_relayed_when_it_comes_again():
    outcomes = [None, {"id": 1}]  # Airflow down at the first attempt
    with TestClient(create_relay_app(SECRET, Settings(), post_event=lambda extra: outcomes.pop(0))) as http:
        assert deliver(http, "d-1").json() == {"relayed": False}
        assert deliver(http, "d-1").json() == {"relayed": True}
    assert outcomes == []
