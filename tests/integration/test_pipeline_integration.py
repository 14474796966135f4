"""The pipeline end to end against the real local servers (S3, MLflow; Airflow for one test).

Every test uses its OWN S3 prefix and registered model name on the session's servers, so tests
never see each other's checkpoints or versions. The checkpoint is the model area's trained tiny
one (`trained_tiny`) when that fixture exists, else a small one trained here. FP8 quality is
not under test here: the quality gate runs for real on a few users with thresholds that always
pass (or, for the failing-gate test, can never pass).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fixtures.stack import environment

from onerec.errors import UserError
from onerec.manifest import write_manifest

pytestmark = pytest.mark.integration

# Margins of 1000%: on 32 users only the sensitive check (top-K overlap) decides, never the sample size.
PASS_THRESHOLDS = {"max_relative_recall_drop": 10.0, "max_relative_ndcg_drop": 10.0, "min_topk_overlap": 0.0}
FAIL_THRESHOLDS = {"max_relative_recall_drop": 10.0, "max_relative_ndcg_drop": 10.0, "min_topk_overlap": 1.01}


# --- setup ------------------------------------------------------------------------------------------


@dataclass
class TinyModel:
    checkpoint_dir: Path
    calibration_path: Path


@pytest.fixture(scope="module")
def tiny(request, tmp_path_factory) -> TinyModel:
    try:
        trained = request.getfixturevalue("trained_tiny")
        return TinyModel(Path(trained.checkpoint_dir), Path(trained.calibration_path))
    except pytest.FixtureLookupError:
        pass
    from onerec.data import calibration_requests, load_dataset, split_leave_last_out
    from onerec.synth import synthesize
    from onerec.train import train

    root = tmp_path_factory.mktemp("pipeline_model")
    synthesize(root / "data", seed=0, users=300, items=200)
    train(root / "data", "tiny", root / "checkpoint", epochs=1, seed=0, progress=False, threads=1)
    split = split_leave_last_out(load_dataset(root / "data"), max_history=50)
    calibration_requests(split, 256, seed=0).to_parquet(root / "calibration.parquet")
    return TinyModel(root / "checkpoint", root / "calibration.parquet")


@pytest.fixture(scope="module")
def stack(s3_and_mlflow, tmp_path_factory):
    """The session's S3 + MLflow in os.environ, a free port for the local serving endpoint."""
    from ops.processes import free_port
    from ops.stack import stack_env

    work = tmp_path_factory.mktemp("pipeline_work")
    env = {**stack_env(s3_and_mlflow), "ONEREC_STATE_DIR": str(work), "ONEREC_LOCAL_SERVE_PORT": str(free_port())}
    with environment(env):
        try:
            yield {"state": s3_and_mlflow, "work": work}
        finally:
            from ops.rollout.local import stop

            stop(state_dir=work)  # the local serving processes the promote/rollback tests started


def config(stack: dict, name: str, thresholds: dict | None = None, **overrides):
    """A PipelineConfig on the session's servers with its own prefix and model name."""
    from ops.stack import stack_env
    from tasks.config import PipelineConfig

    work = stack["work"]
    return PipelineConfig.from_env(stack_env(stack["state"]), {
        "state_dir": str(work), "s3_prefix": f"test-{name}", "model_name": f"onerec-test-{name}",
        "latency_gate_blocking": False, "quality_gate": {**(thresholds or PASS_THRESHOLDS), "max_users": 32},
        "quality_eval_requests": 64, **overrides,
    })


def variant(checkpoint: Path, out: Path, tag: str) -> Path:
    """The same weights plus one file: another checkpoint (another manifest sha256) to publish."""
    shutil.copytree(checkpoint, out)
    (out / "variant.txt").write_text(tag)
    write_manifest(out)
    return out


def publish(cfg, checkpoint: Path, calibration: Path, checkpoint_id: str, date: str = "2026-01-01") -> dict:
    from tasks.publish import publish as publish_checkpoint

    return publish_checkpoint(cfg, str(checkpoint), str(calibration), date, checkpoint_id)


def versions(cfg) -> list:
    from tasks.registry import client

    return list(client(cfg).search_model_versions(f"name='{cfg.model_name}'"))


def runs(cfg) -> list:
    from tasks.registry import EXPERIMENT, client

    c = client(cfg)
    exp = c.get_experiment_by_name(EXPERIMENT)
    return [] if exp is None else list(c.search_runs([exp.experiment_id], f"params.checkpoint_uri LIKE '%/{cfg.s3_prefix}/%'"))


def account(stack: dict, role: str) -> tuple[str, str]:
    creds = stack["state"]["credentials"]["mlflow"][role]
    return creds["username"], creds["password"]


def approve_as_the_ui_does(stack, cfg, version: str, value: str = "approved", role: str = "approver"):
    """The UI's set-tag call, signed in as the stack's `role` account; returns the response."""
    from tasks.demo import approve_as_the_ui_does as approve

    return approve(cfg.tracking_uri(), cfg.model_name, version, account(stack, role), value)


def alias(cfg, name: str) -> str | None:
    from tasks.promote import alias_version
    from tasks.registry import client

    return alias_version(client(cfg), cfg.model_name, name)


# --- S3 contract --------------------------------------------------------------------------------------


def test_incomplete_checkpoint_upload_is_never_picked(stack, tiny):
    from tasks.checkpoints import download_checkpoint, find_latest_checkpoint, s3_client, upload_file

    cfg = config(stack, "incomplete")
    done = publish(cfg, tiny.checkpoint_dir, tiny.calibration_path, "20260101T000000Z")
    # a newer upload that crashed before its manifest: files there, manifest.json missing
    client = s3_client(cfg)
    for name in ("config.json", "model.safetensors"):
        upload_file(client, tiny.checkpoint_dir / name, f"{cfg.checkpoints_uri}20260102T000000Z/{name}")
    found = find_latest_checkpoint(cfg)
    assert found["checkpoint_id"] == "20260101T000000Z" == done["checkpoint_id"]
    assert found["skipped"] == ["20260102T000000Z"]
    with pytest.raises(UserError, match="incomplete"):
        download_checkpoint(cfg, f"{cfg.checkpoints_uri}20260102T000000Z/", stack["work"] / "never")
    assert not (stack["work"] / "never").exists()


def test_download_verifies_every_file_and_names_the_corrupt_one(stack, tiny):
    from tasks.checkpoints import download_checkpoint, s3_client

    cfg = config(stack, "corrupt")
    done = publish(cfg, tiny.checkpoint_dir, tiny.calibration_path, "20260101T000000Z")
    dst = stack["work"] / "corrupt-download"
    first = download_checkpoint(cfg, done["checkpoint_uri"], dst)
    assert first["checkpoint_sha256"] == done["checkpoint_sha256"] and not first["reused"]
    assert download_checkpoint(cfg, done["checkpoint_uri"], dst)["reused"]
    # someone overwrites the weights in S3 after publishing
    bucket, key = cfg.s3_bucket, f"{cfg.s3_prefix}/checkpoints/20260101T000000Z/semantic_ids.npy"
    s3_client(cfg).put_object(Bucket=bucket, Key=key, Body=b"not the table")
    shutil.rmtree(dst)
    with pytest.raises(UserError, match="semantic_ids.npy"):
        download_checkpoint(cfg, done["checkpoint_uri"], dst)
    assert not dst.exists()  # nothing renamed into place


def test_a_newest_input_that_failed_validation_is_skipped_by_later_runs_with_an_alert(stack, tiny, tmp_path):
    """A damaged newest checkpoint and a newest calibration table that fails validation are
    remembered by sha256: the next runs take the newest good ones and mail on-call about the skip."""
    import pandas as pd
    from aiosmtpd.controller import Controller

    from ops.processes import free_port
    from ops.smtp_sink import MaildirHandler, read_mail
    from tasks.checkpoints import s3_client
    from tasks.errors import StepFailed
    from tasks.requantize import find_step, run_requantize

    maildir = tmp_path / "mail"
    maildir.mkdir()
    port = free_port()
    sink = Controller(MaildirHandler(maildir), hostname="127.0.0.1", port=port)
    sink.start()
    try:
        cfg = config(stack, "rejected", alert_smtp=f"127.0.0.1:{port}")
        publish(cfg, tiny.checkpoint_dir, tiny.calibration_path, "20260101T000000Z", date="2026-01-01")
        publish(cfg, variant(tiny.checkpoint_dir, tmp_path / "bad", "bad"), tiny.calibration_path, "20260102T000000Z",
                date="2026-01-01")
        s3_client(cfg).put_object(Bucket=cfg.s3_bucket, Key=f"{cfg.s3_prefix}/checkpoints/20260102T000000Z/semantic_ids.npy",
                                  Body=b"not the table")
        with pytest.raises(UserError, match="semantic_ids.npy"):
            run_requantize(cfg, until="fetch")
        assert read_mail(maildir) == []
        found = find_step(cfg)
        assert found["checkpoint_id"] == "20260101T000000Z" and found["rejected"] == ["20260102T000000Z"]
        [mail] = read_mail(maildir)
        assert "failed validation before" in mail["Subject"] and "checkpoint 20260102T000000Z" in mail.get_content()

        bad = pd.read_parquet(tiny.calibration_path)
        bad.at[0, "history"] = [10**7]  # an item id the checkpoint does not know
        bad.to_parquet(tmp_path / "bad.parquet")
        publish(cfg, tiny.checkpoint_dir, tmp_path / "bad.parquet", "20260101T000000Z", date="2026-01-02")
        with pytest.raises(StepFailed, match="failed validation"):
            run_requantize(cfg, until="validate")
        found = find_step(cfg)
        assert found["calibration_uri"].rsplit("/", 2)[-2] == "2026-01-01"  # the good table of the day before
        [rejected] = found["rejected_calibration"]
        assert rejected.rsplit("/", 2)[-2] == "2026-01-02"
        assert rejected in read_mail(maildir)[-1].get_content()
    finally:
        sink.stop()


# --- the requantize pipeline --------------------------------------------------------------------------


def test_bad_calibration_data_stops_before_quantization(stack, tiny, tmp_path):
    import pandas as pd

    from tasks.errors import StepFailed
    from tasks.requantize import run_requantize

    cfg = config(stack, "baddata")
    bad = pd.read_parquet(tiny.calibration_path)
    bad.at[0, "history"] = [10**7]  # an item id the checkpoint's tokenizer does not know
    bad.loc[1, bad.columns[-1]] = float("nan")
    bad.to_parquet(tmp_path / "bad.parquet")
    done = publish(cfg, tiny.checkpoint_dir, tmp_path / "bad.parquet", "20260101T000000Z")
    with pytest.raises(StepFailed) as failure:
        run_requantize(cfg)
    message = str(failure.value)
    assert "history_unknown_items" in message and "expect_column_values_to_not_be_null" in message
    work = Path(cfg.state_dir) / "pipeline" / done["checkpoint_id"]
    assert (work / "reports" / "validation" / "data_docs" / "index.html").is_file()
    assert not list(work.glob("quantized-*")), "nothing may be quantized after a validation failure"
    assert versions(cfg) == [] and runs(cfg) == []


def test_happy_path_to_champion_then_idempotent_rerun(stack, tiny):
    import mlflow
    import pandas as pd

    from onerec.serve.registry import download_verified
    from ops.processes import free_port
    from tasks.promote import promote_newest_approved
    from tasks.registry import client
    from tasks.requantize import run_requantize

    # a serving port the environment does not name: the promote's configuration reaches the local rollout
    serve_port = free_port()
    cfg = config(stack, "happy", alert_webhook_url="https://hooks.example.com/T0/B0/webhook-secret-token",
                 airflow_password="airflow-secret-password", local_serve_port=serve_port)
    done = publish(cfg, tiny.checkpoint_dir, tiny.calibration_path, "20260101T000000Z")
    result = run_requantize(cfg)
    # on CPU the latency gate cannot measure; the local config lets that pass, and the label says so
    assert result["registered"] and result["gates"] == "passed-latency-unmeasured"
    [version] = versions(cfg)
    assert version.tags["approval"] == "pending" and version.tags["gates"] == "passed-latency-unmeasured"
    assert version.tags["state"] == "pending" and version.tags["provenance"].startswith("hmac-sha256-v1:")
    description = client(cfg).get_model_version(cfg.model_name, version.version).description
    assert "Latency: NOT MEASURED" in description and "Quality: PASSED" in description
    assert "Promote model" in description and "reports/validation/data_docs/index.html" in description
    assert version.tags["checkpoint_sha256"] == done["checkpoint_sha256"]
    assert version.tags["calibration_sha256"] == done["calibration_sha256"]
    assert version.tags["recipe"] == cfg.recipe and version.tags["checkpoint_uri"] == done["checkpoint_uri"]
    assert alias(cfg, "challenger") == version.version
    run = mlflow.get_run(result["run_id"])
    assert run.data.params["checkpoint_sha256"] == done["checkpoint_sha256"]
    # no secret field of the config (by type) reaches a run param or tag, by name or by value
    from onerec.settings import secret_fields

    secrets = {field: getattr(cfg, field) for field in secret_fields(type(cfg))}
    assert {"alert_webhook_url", "aws_access_key_id", "aws_secret_access_key", "airflow_password"} <= set(secrets)
    logged = {**run.data.params, **run.data.tags}
    for field, value in secrets.items():
        assert value, field  # set here, so its absence below means something
        assert not any(field in k for k in logged) and not any(value in str(v) for v in logged.values()), field
    assert "quality.top10_overlap" in run.data.metrics
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(result["run_id"], "reports")}
    assert {"reports/gates.json", "reports/validation", "reports/quality_gate.json", "reports/quality_gate.png",
            "reports/latency_gate.json", "reports/quantization"} <= artifacts
    # measurements are metrics, the gates' settings are params (config.*), never metrics
    assert "quality.config.k" not in run.data.metrics and "latency.thresholds.repeats" not in run.data.metrics
    assert run.data.params["config.quality_gate.k"] == "10"
    # every report the review page links is an artifact of the run, under the link's path
    from tasks.review_page import REPORTS

    for _, path in REPORTS:
        folder, _, name = f"reports/{path}".rpartition("/")
        assert f"reports/{path}" in {a.path for a in mlflow.MlflowClient().list_artifacts(result["run_id"], folder)}
        assert f"/runs/{result['run_id']}/artifacts/reports/{path})" in description

    # nothing is promoted before an engineer approves
    assert promote_newest_approved(cfg)["promoted"] is None and alias(cfg, "champion") is None

    # the registered model answers as a pyfunc and downloads as a verified folder
    model = mlflow.pyfunc.load_model(f"models:/{cfg.model_name}@challenger")
    requests = pd.read_parquet(tiny.calibration_path).head(3).drop(columns=["target"])
    out = model.predict(requests, params={"k": 5})
    assert len(out) == 3 and all(len(items) == 5 for items in out["items"])
    signed = client(cfg).get_model_version(cfg.model_name, version.version).tags["version_sha256"]
    folder = download_verified(f"models:/{cfg.model_name}/{version.version}", stack["work"] / "download", signed,
                               cfg.tracking_uri())
    assert (folder / "recipe.json").is_file() and (folder / "manifest.json").is_file()

    approve_as_the_ui_does(stack, cfg, version.version).raise_for_status()
    promoted = promote_newest_approved(cfg)
    assert promoted["promoted"] == version.version and promoted["approved_by"] == "approver"
    assert promoted["registering_run"] == result["run_id"]
    assert alias(cfg, "champion") == version.version and alias(cfg, "challenger") is None
    tags = client(cfg).get_model_version(cfg.model_name, version.version).tags
    assert tags["deployed_at"] and tags["helm_revision"] == str(promoted["rollout"]["revision"])
    served = httpx.post(f"{promoted['rollout']['url']}/v1/recommend",
                        json={"users": [{"history": requests["history"].iloc[0].tolist()}], "k": 3}, timeout=60)
    assert served.status_code == 200 and served.json()["model"]["version"] == version.version
    assert promoted["rollout"]["url"] == f"http://127.0.0.1:{serve_port}"

    # the same checkpoint and recipe again: nothing new (no quantization, no version, no run), also
    # when the service account deleted the mirror tag `state` (it decides nothing)
    client(cfg).delete_model_version_tag(cfg.model_name, version.version, "state")
    n_runs = len(runs(cfg))
    again = run_requantize(cfg)
    assert again["registered"] is False and again["existing"]["version"] == version.version
    assert len(versions(cfg)) == 1 and len(runs(cfg)) == n_runs
    assert promote_newest_approved(cfg)["promoted"] is None  # deployed versions are not rolled out again


def test_failing_gate_registers_nothing(stack, tiny):
    from tasks.requantize import run_requantize

    cfg = config(stack, "failgate", thresholds=FAIL_THRESHOLDS)
    publish(cfg, tiny.checkpoint_dir, tiny.calibration_path, "20260101T000000Z")
    result = run_requantize(cfg)
    assert result["registered"] is False and result["gates"] == "failed" and result["version"] is None
    assert versions(cfg) == []
    [run] = runs(cfg)
    assert run.data.tags["gates"] == "failed" and run.data.metrics["quality.passed"] == 0.0
    # a re-run on the same inputs does not repeat the work
    assert run_requantize(cfg)["existing"]["status"] == "failed" and len(runs(cfg)) == 1


def test_latency_gate_that_cannot_measure_blocks_in_production(stack, tiny):
    from tasks.requantize import run_requantize

    cfg = config(stack, "blocking", latency_gate_blocking=True)
    publish(cfg, tiny.checkpoint_dir, tiny.calibration_path, "20260101T000000Z")
    result = run_requantize(cfg)
    # on CPU (no FP8 GPU) the latency gate is not measurable: production config registers nothing
    assert result["gates"] == "unmeasured" and versions(cfg) == []


def test_rollback_restores_the_previous_champion(stack, tiny, tmp_path):
    from tasks.approval import expire_stale
    from tasks.promote import promote_newest_approved
    from tasks.registry import client
    from tasks.requantize import run_requantize
    from tasks.rollback import rollback

    cfg = config(stack, "rollback")
    c = client(cfg)
    publish(cfg, tiny.checkpoint_dir, tiny.calibration_path, "20260101T000000Z")
    v1 = run_requantize(cfg)["version"]
    approve_as_the_ui_does(stack, cfg, v1)
    promote_newest_approved(cfg)
    publish(cfg, variant(tiny.checkpoint_dir, tmp_path / "v2", "v2"), tiny.calibration_path, "20260102T000000Z")
    v2 = run_requantize(cfg)["version"]
    assert v2 != v1 and alias(cfg, "challenger") == v2
    approve_as_the_ui_does(stack, cfg, v2)
    assert promote_newest_approved(cfg)["promoted"] == v2
    assert (alias(cfg, "champion"), alias(cfg, "previous-champion")) == (v2, v1)

    with pytest.raises(UserError, match="reason"):
        rollback(cfg, "  ")
    from tasks.approval import record_uri
    from tasks.checkpoints import read_json, s3_client, write_json

    deployed_record = read_json(s3_client(cfg), record_uri(cfg, v2))  # an S3 writer keeps a copy
    result = rollback(cfg, "p99 latency regression (INC-42)", by="oncall@example.com")
    assert result["champion"] == v1 and result["rolled_back_from"] == v2
    assert alias(cfg, "champion") == v1 and alias(cfg, "previous-champion") is None
    tags = c.get_model_version(cfg.model_name, v2).tags
    assert tags["rollback_reason"] == "p99 latency regression (INC-42)"
    assert tags["rolled_back_by"] == "oncall@example.com" and tags["rolled_back_at"]
    from ops.rollout.local import status as local_status

    assert local_status(state_dir=cfg.state_dir)["current"]["version"] == v1
    assert promote_newest_approved(cfg)["promoted"] is None  # the rolled-back version stays out
    # whatever its tags say later: an approver re-approves it, someone deletes deployed_at
    c.delete_model_version_tag(cfg.model_name, v2, "deployed_at")
    approve_as_the_ui_does(stack, cfg, v2, "pending").raise_for_status()
    approve_as_the_ui_does(stack, cfg, v2).raise_for_status()
    with pytest.raises(UserError, match="refused"):
        promote_newest_approved(cfg)
    with pytest.raises(UserError, match="rolled_back"):
        rollback(cfg, "restore it anyway", version=v2)
    assert (alias(cfg, "champion"), local_status(state_dir=cfg.state_dir)["current"]["version"]) == (v1, v1)
    assert "terminal" in c.get_model_version(cfg.model_name, v2).tags["promotion_refused"]
    with pytest.raises(UserError, match="digits only"):
        rollback(cfg, "bad form input", version="2; rm -rf /")
    # the copy put back: validly signed, but older than the last record written -> refused
    assert deployed_record["state"] == "deployed"
    write_json(s3_client(cfg), record_uri(cfg, v2), deployed_record)
    with pytest.raises(UserError, match="older than the last one written"):
        rollback(cfg, "restore the replayed record", version=v2)
    assert (alias(cfg, "champion"), local_status(state_dir=cfg.state_dir)["current"]["version"]) == (v1, v1)

    # a third candidate nobody approves expires; its challenger alias goes with it
    publish(cfg, variant(tiny.checkpoint_dir, tmp_path / "v3", "v3"), tiny.calibration_path, "20260103T000000Z")
    v3 = run_requantize(cfg)["version"]
    assert expire_stale(cfg)["expired"] == []
    expired = expire_stale(config(stack, "rollback", approval_max_age_hours=0.0))
    assert expired["expired"] == [v3] and alias(cfg, "challenger") is None
    assert c.get_model_version(cfg.model_name, v3).tags["state"] == "expired"


def test_failed_rollout_leaves_aliases_unchanged(stack, tiny, monkeypatch):
    from ops import rollout
    from tasks.promote import promote_newest_approved
    from tasks.requantize import run_requantize

    cfg = config(stack, "failrollout")
    publish(cfg, tiny.checkpoint_dir, tiny.calibration_path, "20260101T000000Z")
    v1 = run_requantize(cfg)["version"]
    approve_as_the_ui_does(stack, cfg, v1)

    real_deploy = rollout.deploy

    def broken_deploy(*args, **kwargs):
        raise rollout.RolloutError("new pods never became ready")

    monkeypatch.setattr(rollout, "deploy", broken_deploy)
    with pytest.raises(UserError, match="never became ready"):
        promote_newest_approved(cfg)
    assert alias(cfg, "champion") is None and alias(cfg, "challenger") == v1
    from tasks.approval import read_record
    from tasks.registry import client

    assert "deployed_at" not in client(cfg).get_model_version(cfg.model_name, v1).tags

    # a run on another host (no shared lock file) moves the champion while this rollout runs:
    # this run moves no alias and says so
    def deploy_while_another_host_promotes(*args, **kwargs):
        result = real_deploy(*args, **kwargs)
        client(cfg).set_registered_model_alias(cfg.model_name, "champion", v1)
        return result

    monkeypatch.setattr(rollout, "deploy", deploy_while_another_host_promotes)
    with pytest.raises(UserError, match=f"champion changed from None to {v1} while this rollout ran"):
        promote_newest_approved(cfg)
    assert alias(cfg, "challenger") == v1 and read_record(cfg, v1)["state"] == "approved"
    assert "deployed_at" not in client(cfg).get_model_version(cfg.model_name, v1).tags


def test_a_registration_that_stopped_halfway_leaves_no_version_or_is_replaced(stack, tiny, monkeypatch):
    """The tracking server fails between creating the version and signing it: the version goes.
    When even that cleanup fails (as after kill -9), the next run registers the checkpoint again
    instead of answering "already registered" forever, and leaves the unsigned version alone: only
    the run that created a version deletes it."""
    from mlflow import MlflowClient

    from tasks import provenance
    from tasks.requantize import run_requantize

    cfg = config(stack, "halfway")
    publish(cfg, tiny.checkpoint_dir, tiny.calibration_path, "20260101T000000Z")

    def tracking_server_went_away(*args, **kwargs):
        raise ConnectionError("the tracking server went away")

    monkeypatch.setattr(provenance, "sign_version", tracking_server_went_away)
    with pytest.raises(ConnectionError, match="went away"):
        run_requantize(cfg)
    assert versions(cfg) == []  # created, then deleted again by the run that stopped

    monkeypatch.setattr(MlflowClient, "delete_model_version", tracking_server_went_away)
    with pytest.raises(ConnectionError, match="went away"):
        run_requantize(cfg)
    [left] = versions(cfg)
    assert "state" not in left.tags and "provenance" not in left.tags
    monkeypatch.undo()

    result = run_requantize(cfg)
    assert result["registered"] and result["version"] != left.version
    both = {v.version: v for v in versions(cfg)}
    assert set(both) == {left.version, result["version"]} and "state" not in both[left.version].tags
    assert both[result["version"]].tags["state"] == "pending"
    assert alias(cfg, "challenger") == result["version"]
    assert run_requantize(cfg)["registered"] is False and len(versions(cfg)) == 2


# --- trust: only what the pipeline gated and an approver approved is deployed ------------------------


def test_only_approvers_decide_and_forged_or_dead_versions_are_refused(stack, tiny, tmp_path):
    from mlflow.exceptions import MlflowException

    from ops.rollout.local import status as local_status
    from tasks.approval import review
    from tasks.promote import promote, promote_newest_approved
    from tasks.registry import client
    from tasks.requantize import run_requantize

    cfg = config(stack, "trust")
    c = client(cfg)  # the pipeline's service account
    publish(cfg, tiny.checkpoint_dir, tiny.calibration_path, "20260101T000000Z")
    v1 = run_requantize(cfg)["version"]

    # the viewer and the service account cannot decide: 403, nothing changes
    for role in ("viewer", "service"):
        refused = approve_as_the_ui_does(stack, cfg, v1, role=role)
        assert refused.status_code == 403, (role, refused.text)
    tags = c.get_model_version(cfg.model_name, v1).tags
    assert tags["approval"] == "pending" and "approval_by" not in tags

    # a typo is flagged on the version and decides nothing; capitals and spaces are fine
    approve_as_the_ui_does(stack, cfg, v1, "aproved").raise_for_status()
    assert review(cfg)["flagged"] == [v1]
    tags = c.get_model_version(cfg.model_name, v1).tags
    assert "'aproved'" in tags["approval_problem"] and tags["state"] == "pending"
    approve_as_the_ui_does(stack, cfg, v1, " Approved ").raise_for_status()
    promoted = promote_newest_approved(cfg)
    assert promoted["promoted"] == v1 and promoted["approved_by"] == "approver"
    tags = c.get_model_version(cfg.model_name, v1).tags
    assert tags["state"] == "deployed" and tags["approval_by"] == "approver" and "approval_problem" not in tags

    # a forger with registry write access (here: the service account's password) cannot register a
    # pre-approved version, and a version copied from v1's artifacts and tags is never promoted
    legit = c.get_model_version(cfg.model_name, v1)
    forged_tags = {k: v for k, v in legit.tags.items() if k not in ("approval_by", "approval_at", "state")}
    logged_model = legit.source.removeprefix("models:/")  # the same model artifacts as v1
    with pytest.raises(MlflowException, match="pending only"):
        c.create_model_version(cfg.model_name, legit.source, run_id=legit.run_id, tags=forged_tags,
                               model_id=logged_model)
    with pytest.raises(MlflowException, match="pending only.*state_sequence"):  # nor with a state sequence
        c.create_model_version(cfg.model_name, legit.source, run_id=legit.run_id, model_id=logged_model,
                               tags={**forged_tags, "approval": "pending"})
    del forged_tags["state_sequence"]
    forged = c.create_model_version(cfg.model_name, legit.source, run_id=legit.run_id, model_id=logged_model,
                                    tags={**forged_tags, "approval": "pending"}).version
    approve_as_the_ui_does(stack, cfg, forged).raise_for_status()  # a tired approver
    with pytest.raises(UserError, match=f"refused version.*{forged}"):
        promote_newest_approved(cfg)
    with pytest.raises(UserError, match="no pipeline state record"):
        promote(cfg, forged)
    assert "not registered by the pipeline" in c.get_model_version(cfg.model_name, forged).tags["promotion_refused"]

    # an expired candidate stays dead when someone approves it afterwards
    publish(cfg, variant(tiny.checkpoint_dir, tmp_path / "v3", "v3"), tiny.calibration_path, "20260102T000000Z")
    v3 = run_requantize(cfg)["version"]
    assert review(config(stack, "trust", approval_max_age_hours=0.0))["expired"] == [v3]
    approve_as_the_ui_does(stack, cfg, v3).raise_for_status()
    with pytest.raises(UserError, match="refused"):
        promote_newest_approved(cfg)
    with pytest.raises(UserError, match="expired"):
        promote(cfg, v3)
    assert c.get_model_version(cfg.model_name, v3).tags["state"] == "expired"

    # nothing of it reached serving or the aliases
    assert alias(cfg, "champion") == v1 and alias(cfg, "previous-champion") is None
    assert local_status(state_dir=cfg.state_dir)["current"]["version"] == v1


def test_tampered_evidence_is_refused(stack, tiny):
    from tasks.promote import promote_newest_approved
    from tasks.registry import client
    from tasks.requantize import run_requantize

    cfg = config(stack, "tamper")
    c = client(cfg)
    publish(cfg, tiny.checkpoint_dir, tiny.calibration_path, "20260101T000000Z")
    v1 = run_requantize(cfg)["version"]
    approve_as_the_ui_does(stack, cfg, v1).raise_for_status()
    c.set_model_version_tag(cfg.model_name, v1, "recipe", "fp8_block")  # what an EDIT account can do
    with pytest.raises(UserError, match=f"refused version.*{v1}"):
        promote_newest_approved(cfg)
    assert alias(cfg, "champion") is None
    assert "does not verify" in c.get_model_version(cfg.model_name, v1).tags["promotion_refused"]


# --- through real Airflow ---------------------------------------------------------------------------


@pytest.mark.slow
def test_requantize_dag_through_airflow(local_stack, stack, tiny, tmp_path):
    """`airflow dags test onerec_fp8_requantize` with the stack's Airflow: ends at a registered challenger."""
    from tasks.demo import dags_test

    cfg = config(stack, "airflow")
    done = publish(cfg, tiny.checkpoint_dir, tiny.calibration_path, "20260101T000000Z")
    env = {"ONEREC_S3_PREFIX": cfg.s3_prefix, "ONEREC_MODEL_NAME": cfg.model_name,
           "ONEREC_STATE_DIR": cfg.state_dir, "ONEREC_LATENCY_GATE_BLOCKING": "false",
           "ONEREC_QUALITY_GATE": json.dumps(dataclasses.asdict(cfg.quality_gate)), "ONEREC_QUALITY_EVAL_REQUESTS": "64"}
    run = dags_test("onerec_fp8_requantize", local_stack, tmp_path / "requantize.log", env)
    assert run["state"] == "success", Path(run["log"]).read_text()[-5000:]
    [version] = versions(cfg)
    assert version.tags["checkpoint_sha256"] == done["checkpoint_sha256"] and version.tags["approval"] == "pending"
    assert alias(cfg, "challenger") == version.version
    # a second run short-circuits after check_registered: still one version
    again = dags_test("onerec_fp8_requantize", local_stack, tmp_path / "requantize-2.log", env)
    assert again["state"] == "success" and len(versions(cfg)) == 1
    assert "Skipping downstream tasks" in Path(again["log"]).read_text()


# --- the local stack as a deployment: it comes back after a restart ------------------------------------


def served_version(url: str, history: list[int]) -> str:
    reply = httpx.post(f"{url}/v1/recommend", json={"users": [{"history": history}], "k": 3}, timeout=60,
                       trust_env=False)
    assert reply.status_code == 200, reply.text
    return reply.json()["model"]["version"]


@pytest.mark.slow
def test_stack_restart_brings_back_the_champion_the_approval_events_and_rollback(tiny, chromium, tmp_path):
    """up -> pipeline -> approve (the relay's event starts the promote DAG) -> down -> up: the same
    ports, the champion answers on the proxy port, the DAGs run unpaused, the next approval starts
    a promote run, and on-call's one manual trigger in the Airflow UI (headless Chromium) rolls back
    to the previous champion."""
    import pandas as pd
    from fixtures.browser import trigger_in_airflow_ui
    from fixtures.stack import airflow_api, processes_of, stack_cli, start_stack, wait_for

    from ops.processes import free_port
    from ops.stack import SERVICES, read_state, stack_env
    from tasks.registry import client
    from tasks.requantize import run_requantize

    state_dir, work = tmp_path / "stack", tmp_path / "work"
    ports = {s: free_port() for s in SERVICES}
    proxy = f"http://127.0.0.1:{free_port()}"
    names = {"ONEREC_MODEL_NAME": "onerec-test-restart", "ONEREC_S3_PREFIX": "test-restart"}
    # the DAGs' config: the promote DAG checks the gates as the CPU-only pipeline here ran them
    # no port from this process's environment (an earlier test may have left one): the restart
    # must find the endpoint of the last start by itself
    stack_up_env = {**{k: v for k, v in os.environ.items() if k != "ONEREC_LOCAL_SERVE_PORT"}, **names,
                    "ONEREC_LATENCY_GATE_BLOCKING": "false"}
    state = start_stack(state_dir, ports=ports, env={**stack_up_env, "ONEREC_LOCAL_SERVE_PORT": proxy.rsplit(":", 1)[1]})
    history = pd.read_parquet(tiny.calibration_path)["history"].iloc[0].tolist()
    try:
        # the pipeline runs here (its work dir has no stack.json: no event starts another requantize)
        with environment({**stack_env(state), "ONEREC_STATE_DIR": str(work)}):
            cfg = config({"state": state, "work": work}, "restart")
            assert (cfg.model_name, cfg.s3_prefix) == (names["ONEREC_MODEL_NAME"], names["ONEREC_S3_PREFIX"])
            with airflow_api(state) as airflow:
                dags = wait_for("the three DAGs, parsed", lambda: (
                    found if len(found := airflow.get("/api/v2/dags", params={"dag_id_pattern": "onerec_fp8"}).json()[
                        "dags"]) == 3 else None), timeout_s=180)
                assert not any(d["is_paused"] for d in dags), dags
                # unpaused, the daily job runs today's interval at once (with nothing published it
                # would retry for minutes): ended here, so this test's own requantize runs alone
                # (Airflow 3.3 answers 500 to a PATCH of a run that has not started yet: wait for its start)
                [catch_up] = wait_for("the first daily requantize run, started", lambda: [
                    r for r in airflow.get("/api/v2/dags/onerec_fp8_requantize/dagRuns").json()["dag_runs"]
                    if r.get("start_date")], timeout_s=120)
                wait_for("the first daily requantize run, ended", lambda: airflow.patch(
                    f"/api/v2/dags/onerec_fp8_requantize/dagRuns/{catch_up['dag_run_id']}",
                    json={"state": "failed"}).status_code == 200, timeout_s=60)
            publish(cfg, tiny.checkpoint_dir, tiny.calibration_path, "20260101T000000Z")
            v1 = run_requantize(cfg)["version"]
            approve_as_the_ui_does({"state": state}, cfg, v1).raise_for_status()
            wait_for("the promote run the approval started", lambda: alias(cfg, "champion") == v1, timeout_s=300)
            assert served_version(proxy, history) == v1

        down = stack_cli("down", "--state-dir", str(state_dir), timeout=180)
        assert down.returncode == 0, down.stderr[-3000:]
        assert processes_of(state_dir) == [] and not proxy_answers(proxy)

        up = stack_cli("up", "--state-dir", str(state_dir), env=stack_up_env)  # no ports given: the same as before
        assert up.returncode == 0 and "Traceback" not in up.stderr, up.stderr[-4000:]
        state = read_state(state_dir)
        assert {s: state["services"][s]["port"] for s in SERVICES} == ports
        assert served_version(proxy, history) == v1  # the champion serves again

        with environment({**stack_env(state), "ONEREC_STATE_DIR": str(work)}):
            publish(cfg, variant(tiny.checkpoint_dir, tmp_path / "v2", "v2"), tiny.calibration_path, "20260102T000000Z")
            v2 = run_requantize(cfg)["version"]
            with airflow_api(state) as airflow:
                before = event_runs(airflow)
                approve_as_the_ui_does({"state": state}, cfg, v2).raise_for_status()
                wait_for("the promote run after the restart", lambda: alias(cfg, "champion") == v2, timeout_s=300)
                assert event_runs(airflow) > before
            assert served_version(proxy, history) == v2

            # on-call: the rollback DAG's form in the Airflow UI, the reason only (the previous champion)
            rollback_dag, reason = "onerec_fp8_rollback", "INC-9: p99 doubled after v2"
            with airflow_api(state) as airflow:
                known = {r["dag_run_id"] for r in airflow.get(f"/api/v2/dags/{rollback_dag}/dagRuns").json()["dag_runs"]}
                trigger_in_airflow_ui(chromium, state, rollback_dag, {"reason": reason})
                [run] = wait_for("the rollback run the form started, ended", lambda: [
                    r for r in airflow.get(f"/api/v2/dags/{rollback_dag}/dagRuns").json()["dag_runs"]
                    if r["dag_run_id"] not in known and r["state"] in ("success", "failed")] or None, timeout_s=300)
            assert run["state"] == "success", run
            assert alias(cfg, "champion") == v1 and served_version(proxy, history) == v1
            tags = client(cfg).get_model_version(cfg.model_name, v2).tags
            assert (tags["rollback_reason"], tags["rolled_back_by"]) == (reason, state["credentials"]["airflow"]["username"])
    finally:
        down = stack_cli("down", "--state-dir", str(state_dir), timeout=180)
    assert down.returncode == 0, down.stderr[-3000:]
    assert processes_of(state_dir) == [] and not proxy_answers(proxy)


def event_runs(airflow) -> int:
    """Promote runs that an approval event started."""
    runs = airflow.get("/api/v2/dags/onerec_fp8_promote/dagRuns").json()["dag_runs"]
    return sum(r["run_type"] == "asset_triggered" for r in runs)


def proxy_answers(url: str) -> bool:
    try:
        httpx.get(url + "/_proxy/status", timeout=5, trust_env=False)
        return True
    except httpx.HTTPError:
        return False


def test_copies_and_hand_registered_versions_are_never_candidates(stack, tiny):
    """MLflow's "Promote model" button copies a version, with all its tags, into a registered model:
    into the pipeline's own model the registry refuses the copy (a new version may carry
    approval=pending only). A version registered by hand from a real one's files, tagged to look
    like it, is marked as what it is, and its approval fails the run."""
    from mlflow.exceptions import MlflowException

    from tasks.approval import NOT_REGISTERED_NOTE, review
    from tasks.errors import StepFailed
    from tasks.promote import promote_newest_approved
    from tasks.register import find_existing
    from tasks.registry import client
    from tasks.requantize import run_requantize

    cfg = config(stack, "copied")
    c = client(cfg)
    done = publish(cfg, tiny.checkpoint_dir, tiny.calibration_path, "20260101T000000Z")
    v1 = run_requantize(cfg)["version"]

    def versions():
        return {v.version for v in c.search_model_versions(f"name='{cfg.model_name}'")}

    before = versions()
    with pytest.raises(MlflowException, match="may carry approval=pending only"):
        c.copy_model_version(f"models:/{cfg.model_name}/{v1}", cfg.model_name)  # what the button does
    assert versions() == before

    real = c.get_model_version(cfg.model_name, v1)
    copy = c.create_model_version(cfg.model_name, real.source, run_id=real.run_id, tags={"approval": "pending"},
                                  model_id=real.model_id or real.source.removeprefix("models:/")).version
    for key in ("gates", "state", "checkpoint_sha256", "recipe"):
        c.set_model_version_tag(cfg.model_name, copy, key, real.tags[key])
    assert c.get_model_version(cfg.model_name, copy).tags["gates"] == "passed-latency-unmeasured"  # looks like v1

    reviewed = review(cfg)
    assert reviewed["marked"] == [copy] and review(cfg)["marked"] == []  # once
    marked = c.get_model_version(cfg.model_name, copy)
    assert marked.tags["state"] == "not-registered-by-pipeline" and marked.tags["gates"] == "not-a-candidate"
    assert marked.description.startswith(NOT_REGISTERED_NOTE)
    assert c.get_model_version(cfg.model_name, v1).tags["gates"] == "passed-latency-unmeasured"  # the real one
    assert alias(cfg, "challenger") == v1
    # the checkpoint's registration is still v1, never the copy
    assert find_existing(cfg, done["checkpoint_sha256"], cfg.recipe)["version"] == v1

    # an approver approves the copy: the promote step refuses it and fails (on-call is mailed), also
    # when the DAG's first task (the review) recorded the refusal
    approve_as_the_ui_does(stack, cfg, copy).raise_for_status()
    first_task = review(cfg)
    assert first_task["refused"] == [copy]
    with pytest.raises(StepFailed, match=f"refused version.*'{copy}'"):
        promote_newest_approved(cfg, reviewed_before=first_task)
    assert alias(cfg, "champion") is None


@pytest.mark.slow
def test_a_failed_gate_fails_the_dag_run_and_mails_on_call(local_stack, stack, tiny, chromium, tmp_path):
    """Through the stack's Airflow: gates that said no fail the register task (red in the Grid) after
    the MLflow run holds the reports, and on-call gets one mail naming the task, the reason and the run,
    whose link opens the task in the Airflow UI."""
    from fixtures.browser import screenshot, sign_in_to_airflow
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from ops.smtp_sink import read_mail
    from tasks.demo import dags_test

    cfg = config(stack, "airflowfail", thresholds=FAIL_THRESHOLDS)
    publish(cfg, tiny.checkpoint_dir, tiny.calibration_path, "20260101T000000Z")
    env = {"ONEREC_S3_PREFIX": cfg.s3_prefix, "ONEREC_MODEL_NAME": cfg.model_name,
           "ONEREC_STATE_DIR": cfg.state_dir,
           "ONEREC_QUALITY_GATE": json.dumps(dataclasses.asdict(cfg.quality_gate)), "ONEREC_QUALITY_EVAL_REQUESTS": "64"}
    maildir = Path(local_stack["state_dir"]) / "mail"
    before = len(read_mail(maildir))
    run = dags_test("onerec_fp8_requantize", local_stack, tmp_path / "requantize.log", env)
    text = Path(run["log"]).read_text()
    assert run["state"] == "failed", text[-5000:]
    assert versions(cfg) == []
    [mlflow_run] = runs(cfg)
    assert mlflow_run.data.tags["gates"] == "failed"
    mails = read_mail(maildir)[before:]
    assert len(mails) == 1, [m["Subject"] for m in mails]
    assert mails[0]["Subject"].startswith("[onerec-fp8] onerec_fp8_requantize.register failed: gates failed: quality")
    body = mails[0].get_content()
    assert f"/runs/{mlflow_run.info.run_id}" in body and "Log:   http://127.0.0.1:" in body

    # the mail's link, in the Airflow UI: the run's Grid with the register task Failed (red). (The
    # task's log pane stays empty here: `dags test` runs tasks in its own process, logging to stdout.)
    [link] = [line.removeprefix("Log:   ") for line in body.splitlines() if line.startswith("Log:   ")]
    sign_in_to_airflow(chromium, local_stack)
    chromium.get(link)
    try:
        WebDriverWait(chromium, 90).until(lambda d: "Failed" in d.find_element(By.TAG_NAME, "body").text)
    except TimeoutException:
        screenshot(chromium, tmp_path, "airflow-grid-failed-gate.png")
        pytest.fail(f"{link} never showed the failed task; the page says:\n"
                    f"{chromium.find_element(By.TAG_NAME, 'body').text[:3000]}")
    page = chromium.find_element(By.TAG_NAME, "body").text.splitlines()
    assert "register" in page and "validate" in page and page[page.index("Failed") - 1] == "register"
    screenshot(chromium, tmp_path, "airflow-grid-failed-gate.png")


def test_two_versions_published_on_one_date_keep_their_reports_and_data_docs_open_offline(stack, tiny, tmp_path):
    """Two checkpoints with two calibration tables published on one date: each version's run holds
    its own reports (gate JSON and plots, Data Docs, the review's evidence) whose bytes the second
    run leaves as they were, each set named by its digest (reports/manifest.json, tag
    reports_sha256); the Data Docs downloaded from the run open with no network."""
    import hashlib

    import mlflow
    import pandas as pd

    from onerec.manifest import MANIFEST, sha256_file, verify_manifest
    from tasks.data_docs import offline_problems
    from tasks.requantize import run_requantize

    cfg = config(stack, "reportkeys")

    def reports_of(run_id: str, where: Path) -> dict[str, str]:
        folder = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="reports", dst_path=str(where)))
        verify_manifest(folder)  # every file with the bytes the run's manifest names
        assert mlflow.get_run(run_id).data.tags["reports_sha256"] == sha256_file(folder / MANIFEST)
        return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(folder.rglob("*")) if p.is_file()}

    publish(cfg, tiny.checkpoint_dir, tiny.calibration_path, "20260101T000000Z")
    first = run_requantize(cfg)
    first_reports = reports_of(first["run_id"], tmp_path / "first")
    assert {"gates.json", "quality_gate.json", "quality_gate.png", "validation/data_docs/index.html"} <= set(first_reports)

    other = tmp_path / "other.parquet"  # another table on the same date, another checkpoint
    pd.read_parquet(tiny.calibration_path).iloc[::-1].to_parquet(other)
    publish(cfg, variant(tiny.checkpoint_dir, tmp_path / "v2", "v2"), other, "20260101T120000Z")
    second = run_requantize(cfg)
    assert second["version"] not in (None, first["version"]) and second["run_id"] != first["run_id"]
    second_reports = reports_of(second["run_id"], tmp_path / "second")

    assert reports_of(first["run_id"], tmp_path / "first-again") == first_reports  # byte for byte
    assert second_reports["gates.json"] != first_reports["gates.json"]  # its own evidence (other checkpoint)
    tags = [mlflow.get_run(r["run_id"]).data.tags["reports_sha256"] for r in (first, second)]
    assert tags[0] != tags[1]
    for run in (first, second):  # each version points at its own run's reports
        assert versions_by_number(cfg)[run["version"]].run_id == run["run_id"]
    assert offline_problems(tmp_path / "second" / "reports" / "validation" / "data_docs") == []


def versions_by_number(cfg) -> dict:
    return {v.version: v for v in versions(cfg)}


def test_calibration_is_immutable_and_the_drift_reference_moves_only_on_approval(stack, tiny, tmp_path):
    import pandas as pd

    from tasks.approval import review
    from tasks.checkpoints import find_latest_calibration, read_json, s3_client
    from tasks.errors import StepFailed
    from tasks.requantize import run_requantize

    cfg = config(stack, "immutable", thresholds=FAIL_THRESHOLDS)
    s3 = s3_client(cfg)
    first = publish(cfg, tiny.checkpoint_dir, tiny.calibration_path, "20260101T000000Z")
    # a second table published on the same date: its own key, the first one's bytes untouched
    other = tmp_path / "other.parquet"
    pd.read_parquet(tiny.calibration_path).iloc[::-1].to_parquet(other)
    second = publish(cfg, tiny.checkpoint_dir, other, "20260101T000000Z")
    assert first["calibration_uri"] != second["calibration_uri"]
    assert first["calibration_uri"].endswith(f"/2026-01-01/{first['calibration_sha256']}.parquet")
    assert find_latest_calibration(cfg) == second["calibration_uri"]
    bucket, key = cfg.s3_bucket, first["calibration_uri"].split(f"{cfg.s3_bucket}/", 1)[1]
    assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == tiny.calibration_path.read_bytes()

    # the gates fail: nothing registered, and the drift reference did not move
    assert run_requantize(cfg)["gates"] == "failed"
    assert read_json(s3, cfg.accepted_profile_uri) is None
    assert read_json(s3, cfg.calibration_profile_uri(second["calibration_sha256"]))["rows"] > 0

    # a candidate from the same data: still no reference until an approver approves it
    passing = config(stack, "immutable")
    publish(passing, variant(tiny.checkpoint_dir, tmp_path / "v2", "v2"), other, "20260102T000000Z")
    version = run_requantize(passing)["version"]
    assert read_json(s3, cfg.accepted_profile_uri) is None
    approve_as_the_ui_does(stack, passing, version).raise_for_status()
    assert review(passing)["approved"] == [version]
    assert read_json(s3, cfg.accepted_profile_uri) == read_json(
        s3, cfg.calibration_profile_uri(second["calibration_sha256"]))

    # bytes changed under a digest key are refused at fetch
    s3.put_object(Bucket=bucket, Key=key, Body=other.read_bytes())
    from tasks.checkpoints import download_calibration

    with pytest.raises(StepFailed, match="not the digest its key names"):
        download_calibration(cfg, first["calibration_uri"], tmp_path / "fetched.parquet")


def serve_from_a_plain_shell(state_dir: str, model_uri: str, digest: str, cache_dir: Path) -> dict:
    """`onerec-fp8 serve --model-uri URI --model-digest D` with no MLflow or S3 variables, only the
    stack's state dir: what a person types on the local stack. Returns the answer's model."""
    import subprocess
    import sys
    import time

    from ops.processes import free_port

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "ONEREC_", "AWS_"))}
    env["ONEREC_STATE_DIR"] = state_dir
    port = free_port()
    log = cache_dir / "serve.log"
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "onerec_fp8.cli", "serve", "--model-uri", model_uri,
                                   "--model-digest", digest, "--port", str(port), "--device", "cpu",
                                   "--cache-dir", str(cache_dir)],
                                  stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and server.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2, trust_env=False).status_code == 200:
                    break
            time.sleep(1)
        else:
            pytest.fail(f"serve did not get ready (exit {server.poll()}):\n{log.read_text()[-3000:]}")
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/recommend", json={"users": [{"history": [1, 2, 3]}], "k": 3},
                            timeout=60, trust_env=False)
        answer.raise_for_status()
        return answer.json()["model"]
    finally:
        server.terminate()
        server.wait(timeout=60)


def test_serve_from_the_registry_on_the_local_stack_with_the_read_only_serving_account(stack, tiny, tmp_path):
    from tasks.promote import promote_newest_approved
    from tasks.requantize import run_requantize

    cfg = config(stack, "serveshell")
    publish(cfg, tiny.checkpoint_dir, tiny.calibration_path, "20260101T000000Z")
    version = run_requantize(cfg)["version"]
    approve_as_the_ui_does(stack, cfg, version).raise_for_status()
    assert promote_newest_approved(cfg)["promoted"] == version

    state_dir = stack["state"]["state_dir"]
    from tasks.approval import read_record

    digest = read_record(cfg, version)["history"][-1]["version_sha256"]  # the deployed entry (runbook)
    served = serve_from_a_plain_shell(state_dir, f"models:/{cfg.model_name}@champion", digest, tmp_path / "serve")
    assert served["version"] == version
    # the account it used is the stack's read-only one: it reads, and every write is refused
    serving = account(stack, "serving")
    assert Path(state_dir, "secrets", "mlflow-serving.json").stat().st_mode & 0o777 == 0o600
    refused = httpx.post(f"{cfg.tracking_uri()}/api/2.0/mlflow/model-versions/set-tag", auth=serving, timeout=30,
                         json={"name": cfg.model_name, "version": version, "key": "x", "value": "y"}, trust_env=False)
    assert refused.status_code == 403
    assert serving[1] not in (tmp_path / "serve" / "serve.log").read_text()  # never logged
