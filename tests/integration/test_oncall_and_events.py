"""On-call and events against the real local stack: a failing DAG run mails on-call (read from the
stack's mail sink), and an approval in the registry triggers the promote DAG through MLflow's
webhook, the approval relay and an Airflow asset event, without waiting for the schedule.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from fixtures.browser import trigger_in_airflow_ui
from fixtures.stack import airflow_api, wait_for

from ops.smtp_sink import read_mail

pytestmark = pytest.mark.integration


@pytest.mark.slow
def test_failing_dag_run_mails_on_call(local_stack, tmp_path):
    """A real `airflow dags test` run of the rollback DAG that fails (nothing to restore): one mail."""
    from mlflow.exceptions import MlflowException

    from ops.stack import stack_env
    from tasks.config import PipelineConfig
    from tasks.demo import dags_test
    from tasks.registry import client

    # the model exists (as the service account's), its version 424242 does not
    cfg = PipelineConfig.from_env({**stack_env(local_stack), "ONEREC_MODEL_NAME": "onerec-test-oncall"})
    with contextlib.suppress(MlflowException):
        client(cfg).create_registered_model(cfg.model_name)
    maildir = Path(local_stack["state_dir"]) / "mail"
    before = len(read_mail(maildir))
    run = dags_test("onerec_fp8_rollback", local_stack, tmp_path / "rollback.log",
                    {"ONEREC_MODEL_NAME": "onerec-test-oncall", "ONEREC_S3_PREFIX": "test-oncall"},
                    conf={"reason": "on-call notification test", "version": "424242"}, timeout_s=600)
    text = Path(run["log"]).read_text()
    assert run["state"] == "failed", text[-3000:]
    assert "onerec-test-oncall has no version 424242" in text and "up_for_retry" not in text.lower()
    mails = wait_for("the failure mail", lambda: read_mail(maildir)[before:] or None, timeout_s=60)
    assert len(mails) == 1
    [mail] = mails
    # what failed, where, why in one line, and the link to the task's log
    assert mail["Subject"].startswith("[onerec-fp8] onerec_fp8_rollback.rollback failed: ")
    assert "no version 424242" in mail["Subject"] and mail["To"] == "onerec-oncall@localhost"
    lines = mail.get_content().splitlines()
    assert "DAG:   onerec_fp8_rollback" in lines and "Task:  rollback" in lines
    [error] = [line for line in lines if line.startswith("Error: ")]
    assert "no version 424242" in error and "Traceback" not in mail.get_content()
    [link] = [line for line in lines if line.startswith("Log:   ")]
    assert link.startswith(f"Log:   {local_stack['services']['airflow']['url']}/dags/onerec_fp8_rollback/runs/")


@pytest.mark.slow
def test_rollback_form_input_is_refused_in_one_line(local_stack, chromium, tmp_path):
    """Bad rollback form input through the real Airflow: in the UI's trigger form (headless Chromium),
    which shows each field's title and rule, and through the REST trigger the form posts to. The
    trigger is accepted (no raw JSON-schema text), the run's check_form task fails at once without
    a retry, the rollback never starts, and on-call's mail says in one line what to fix."""
    maildir = Path(local_stack["state_dir"]) / "mail"
    dag = "onerec_fp8_rollback"
    bad_version = "version: a registry version number such as 12 (digits only"
    bad_reason = "reason: say why you roll back, at least 3 characters"
    with airflow_api(local_stack) as airflow:
        wait_for("the rollback DAG", lambda: airflow.get(f"/api/v2/dags/{dag}").status_code == 200, 240)
        airflow.patch(f"/api/v2/dags/{dag}", json={"is_paused": False}).raise_for_status()
        try:
            # the form, as on-call fills it in: a version that is not a number
            before, known = len(read_mail(maildir)), set(_run_ids(airflow, dag))
            form = trigger_in_airflow_ui(chromium, local_stack, dag, {"reason": "INC-7: p99 doubled", "version": "v2"},
                                         shot=(tmp_path, "airflow-rollback-form.png"))
            for shown in ("Reason (required)", "at least 3 characters", "Version to restore (optional)",
                          "digits only", "previous-champion"):
                assert shown in form, form
            [run_id] = wait_for("the run the form started",
                                lambda: [r for r in _run_ids(airflow, dag) if r not in known], 60)
            _failed_in_check_form(airflow, dag, run_id)
            _assert_one_line_mail(maildir, before, dag, bad_version)

            # the REST trigger the form posts to: a reason too short
            before = len(read_mail(maildir))
            reply = airflow.post(f"/api/v2/dags/{dag}/dagRuns",
                                 json={"logical_date": None, "conf": {"reason": "x", "version": None}})
            assert reply.status_code == 200, reply.text
            _failed_in_check_form(airflow, dag, reply.json()["dag_run_id"])
            _assert_one_line_mail(maildir, before, dag, bad_reason)
        finally:
            airflow.patch(f"/api/v2/dags/{dag}", json={"is_paused": True})


def _run_ids(airflow, dag: str) -> list[str]:
    return [r["dag_run_id"] for r in airflow.get(f"/api/v2/dags/{dag}/dagRuns").json()["dag_runs"]]


def _failed_in_check_form(airflow, dag: str, run_id: str) -> None:
    """The run failed in check_form at its first try; the rollback never started."""
    runs = f"/api/v2/dags/{dag}/dagRuns/{quote(run_id, safe='')}"

    def finished():
        run = airflow.get(runs).json()
        return run if run["state"] in ("success", "failed") else None

    assert wait_for(f"rollback run {run_id}", finished, 300, every_s=3)["state"] == "failed"
    tis = {t["task_id"]: t for t in airflow.get(f"{runs}/taskInstances").json()["task_instances"]}
    assert tis["check_form"]["state"] == "failed" and tis["check_form"]["try_number"] == 1
    assert tis["rollback"]["state"] == "upstream_failed"


def _assert_one_line_mail(maildir: Path, before: int, dag: str, message: str) -> None:
    [mail] = wait_for("the failure mail", lambda: read_mail(maildir)[before:] or None, timeout_s=90)
    assert mail["Subject"].startswith(f"[onerec-fp8] {dag}.check_form failed: {message}"), mail["Subject"]
    [error] = [line for line in mail.get_content().splitlines() if line.startswith("Error: ")]
    assert error.startswith(f"Error: {message}") and "Traceback" not in mail.get_content()


@pytest.mark.slow
def test_approval_event_triggers_promote_at_once(local_stack):
    from tasks.demo import approve_as_the_ui_does

    state = local_stack
    mlflow_url = state["services"]["mlflow"]["url"]
    accounts = state["credentials"]["mlflow"]
    service = (accounts["service"]["username"], accounts["service"]["password"])
    approver = (accounts["approver"]["username"], accounts["approver"]["password"])
    name = "onerec-test-events"
    with httpx.Client(base_url=mlflow_url, auth=service, timeout=30, trust_env=False) as http:
        http.post("/api/2.0/mlflow/registered-models/create", json={"name": name}).raise_for_status()
        version = http.post("/api/2.0/mlflow/model-versions/create", json={
            "name": name, "source": "s3://onerec/nothing", "tags": [{"key": "approval", "value": "pending"}],
        }).json()["model_version"]["version"]

    with airflow_api(state) as airflow:
        # the promote DAG is parsed (its asset exists) and unpaused; its hourly schedule will not fire now
        wait_for("the promote DAG", lambda: airflow.get("/api/v2/dags/onerec_fp8_promote").status_code == 200)
        airflow.patch("/api/v2/dags/onerec_fp8_promote", json={"is_paused": False}).raise_for_status()
        try:
            approve_as_the_ui_does(mlflow_url, name, version, approver).raise_for_status()

            assets = airflow.get("/api/v2/assets", params={"name_pattern": "onerec_model_approved"}).json()["assets"]

            def this_approvals_event():
                # other tests on this stack approved too: look for this version's event. Airflow 3.3's
                # listing answers 500 while a run an event created is still queued: asked again then.
                listing = airflow.get("/api/v2/assets/events", params={"asset_id": assets[0]["id"], "limit": 100})
                if listing.status_code != 200:
                    return None
                return [e for e in listing.json()["asset_events"] if e["created_dagruns"]
                        and e["extra"].get("name") == name and e["extra"].get("version") == version]

            # the event exists as soon as the relay posts it; the scheduler adds the run it starts
            [event] = wait_for("this approval's asset event and the promote run it started", this_approvals_event,
                               timeout_s=120)
            assert event["created_dagruns"][0]["dag_id"] == "onerec_fp8_promote", event
        finally:
            airflow.patch("/api/v2/dags/onerec_fp8_promote", json={"is_paused": True})


@pytest.mark.slow
def test_relay_refuses_unsigned_or_forged_deliveries(local_stack):
    relay = local_stack["services"]["relay"]["url"]
    body = b'{"entity": "model_version_tag", "action": "set", "data": {"key": "approval", "name": "x", "version": "1"}}'
    stamp = str(int(time.time()))
    wrong = "v1," + base64.b64encode(hmac.new(b"not the secret", f"d.{stamp}.".encode() + body,
                                              hashlib.sha256).digest()).decode()
    for headers in ({}, {"X-MLflow-Delivery-Id": "d", "X-MLflow-Timestamp": stamp, "X-MLflow-Signature": wrong}):
        assert httpx.post(f"{relay}/mlflow-webhook", content=body, headers=headers, trust_env=False).status_code == 401
