"""Promotion through a canary on the local stack (real S3, MLflow, the pipeline's registration,
the local serving proxy and servers, the mail sink), with live traffic sent to the endpoint.

A good candidate (the same weights as the champion under another checkpoint) walks every step to
champion. A bad one (a checkpoint whose weights were damaged: its FP8 artifact passes the offline
gates, which compare it with its own bf16 version, but its answers differ from the champion's) is
rolled back by the analysis at the first step: the champion keeps serving everything, untouched,
the version is marked and on-call gets a mail.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from fixtures.stack import environment

from onerec.errors import UserError
from onerec.manifest import write_manifest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PASS_THRESHOLDS = {"max_relative_recall_drop": 10.0, "max_relative_ndcg_drop": 10.0, "min_topk_overlap": 0.0}
VERDICT = "canary"  # tasks.canary.VERDICT_TAG
CANARY = {"weights": [20, 50, 100], "hold_s": 1.0, "min_requests": 6, "min_mirrored": 6, "step_timeout_s": 240,
          "poll_s": 0.25, "max_p99_ratio": 10.0, "min_topk_overlap": 0.5, "max_score_shift": 1.0}


@pytest.fixture(scope="module")
def stack(s3_and_mlflow, trained_tiny, tmp_path_factory):
    """The session's S3 + MLflow, a mail sink and a local serving endpoint of this module's own."""
    from ops.processes import free_port, spawn_detached, stop_processes
    from ops.stack import stack_env
    from tasks.config import PipelineConfig

    work = tmp_path_factory.mktemp("canary_work")
    smtp_port = free_port()
    sink = spawn_detached([sys.executable, "-m", "ops.smtp_sink", "--port", str(smtp_port), "--maildir",
                           str(work / "mail")], work / "smtp.log")
    env = {**stack_env(s3_and_mlflow), "ONEREC_STATE_DIR": str(work), "ONEREC_LOCAL_SERVE_PORT": str(free_port())}
    cfg = PipelineConfig.from_env(env, {
        "s3_prefix": "test-canary", "model_name": "onerec-test-canary", "latency_gate_blocking": False,
        "quality_gate": {**PASS_THRESHOLDS, "max_users": 32}, "quality_eval_requests": 64,
        "alert_smtp": f"127.0.0.1:{smtp_port}", "canary": CANARY,
    })
    with environment(env):  # boto3, MLflow and the serving processes read it
        try:
            yield {"state": s3_and_mlflow, "cfg": cfg, "work": work, "calibration": trained_tiny.calibration_path}
        finally:
            from ops.rollout.local import stop

            stop(state_dir=work)
            stop_processes([sink], 10)


def register(stack, checkpoint: Path, checkpoint_id: str) -> str:
    """Publish `checkpoint` and run the pipeline on it; the approved version."""
    from tasks.demo import approve_as_the_ui_does
    from tasks.publish import publish
    from tasks.requantize import run_requantize

    cfg = stack["cfg"]
    publish(cfg, str(checkpoint), str(stack["calibration"]), "2026-01-01", checkpoint_id)
    result = run_requantize(cfg)
    assert result["registered"], result
    creds = stack["state"]["credentials"]["mlflow"]["approver"]
    approve_as_the_ui_does(cfg.tracking_uri(), cfg.model_name, result["version"],
                           (creds["username"], creds["password"])).raise_for_status()
    return result["version"]


def variant(checkpoint: Path, out: Path, damage: float = 0.0) -> Path:
    """Another checkpoint: the same weights (damage 0) or every matrix plus noise of `damage` times its std."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(checkpoint, out)
    (out / "variant.txt").write_text(out.name)
    if damage:
        rng = np.random.default_rng(7)
        weights = load_file(out / "model.safetensors")
        for name, w in weights.items():
            if w.ndim == 2 and np.issubdtype(w.dtype, np.floating):
                weights[name] = (w + rng.normal(0, damage * float(w.std()), w.shape)).astype(w.dtype)
        save_file(weights, out / "model.safetensors")
    write_manifest(out)
    return out


@contextlib.contextmanager
def live_traffic(url: str, histories: list[list[int]], max_s: float = 600):
    """Recommendation requests to `url`, one after the other, until the block ends (or `max_s`);
    yields the list of (status, version) answers."""
    answers: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def send():
        deadline = time.monotonic() + max_s
        with httpx.Client(timeout=30) as client:
            i = 0
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    r = client.post(url + "/v1/recommend", json={"users": [{"history": histories[i % len(histories)]}],
                                                                 "k": 5, "beam": 16})
                    answers.append((r.status_code, r.json().get("model", {}).get("version")))
                except httpx.HTTPError:
                    answers.append((0, None))
                i += 1

    thread = threading.Thread(target=send, name="live-traffic", daemon=True)
    thread.start()
    try:
        yield answers
    finally:
        stop.set()
        thread.join(60)


def test_a_good_candidate_walks_to_champion_and_a_damaged_one_is_rolled_back(stack, trained_tiny, tmp_path):
    from ops.rollout.local import status as local_status
    from ops.smtp_sink import read_mail
    from tasks.promote import alias_version, promote_newest_approved
    from tasks.registry import client

    cfg = stack["cfg"]
    c = client(cfg)
    histories = [[int(i) for i in h] for h in pd.read_parquet(trained_tiny.calibration_path)["history"].head(40)]

    v1 = register(stack, trained_tiny.checkpoint_dir, "20260101T000000Z")
    assert promote_newest_approved(cfg)["promoted"] == v1  # no champion yet: no canary
    assert VERDICT not in c.get_model_version(cfg.model_name, v1).tags
    endpoint = local_status(state_dir=cfg.state_dir)["url"]

    v2 = register(stack, variant(trained_tiny.checkpoint_dir, tmp_path / "good"), "20260102T000000Z")
    with live_traffic(endpoint, histories) as answers:
        promoted = promote_newest_approved(cfg)
    assert promoted["promoted"] == v2
    steps = promoted["rollout"]["canary"]["steps"]
    assert [(s["weight"], s["verdict"]) for s in steps] == [(20, "passed"), (50, "passed"), (100, "passed")]
    assert all(s["canary"]["requests"] >= CANARY["min_requests"] for s in steps)
    assert steps[0]["mirror"]["compared"] >= CANARY["min_mirrored"] and steps[0]["mirror"]["overlap_mean"] > 0.9
    served = {version for code, version in answers if code == 200}
    assert {v1, v2} <= served and all(code == 200 for code, _ in answers), answers[-5:]
    assert (alias_version(c, cfg.model_name, "champion"), local_status(state_dir=cfg.state_dir)["current"]["version"]) \
        == (v2, v2)
    tags = c.get_model_version(cfg.model_name, v2).tags
    assert tags[VERDICT] == "passed" and json.loads(tags["canary_step_3"])["weight"] == 100
    assert tags["canary_report"].endswith("/reports/canary.png") and tags["state"] == "deployed"

    mails_before = len(read_mail(stack["work"] / "mail"))
    v3 = register(stack, variant(trained_tiny.checkpoint_dir, tmp_path / "damaged", damage=1.0), "20260103T000000Z")
    with live_traffic(endpoint, histories) as answers, pytest.raises(UserError, match="canary failed at step 1"):
        promote_newest_approved(cfg)
    # the champion untouched and serving everything; the candidate marked and gone
    assert alias_version(c, cfg.model_name, "champion") == v2
    after = local_status(state_dir=cfg.state_dir)
    assert after["current"]["version"] == v2 and after["current"]["alive"]
    assert httpx.get(endpoint + "/_proxy/status").json()["canary"] is None
    assert all(code == 200 for code, _ in answers) and {v for _, v in answers} <= {v2, v3}
    r = httpx.post(endpoint + "/v1/recommend", json={"users": [{"history": histories[0]}]}, timeout=30)
    assert r.json()["model"]["version"] == v2
    tags = c.get_model_version(cfg.model_name, v3).tags
    assert tags[VERDICT] == "failed" and "top-k overlap" in tags["canary_reason"]
    assert tags["state"] == "rolled_back" and "canary_step_2" not in tags
    step = json.loads(tags["canary_step_1"])
    assert step["verdict"] == "failed" and step["mirror"]["overlap_mean"] < CANARY["min_topk_overlap"]
    mails = read_mail(stack["work"] / "mail")[mails_before:]
    assert len(mails) == 1 and f"version {v3} rolled back" in mails[0]["Subject"]
    assert f"champion {v2} serves all traffic again" in mails[0].get_content()
    # the walk of both versions is recorded and drawn on their registering runs
    import mlflow

    for version, verdict, n_steps in ((v2, "passed", 3), (v3, "failed", 1)):
        run_id = c.get_model_version(cfg.model_name, version).run_id
        folder = tmp_path / f"canary-{verdict}"
        for name in ("canary.json", "canary.png"):
            mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"reports/{name}", dst_path=str(folder))
        report = json.loads((folder / "canary.json").read_text())
        assert (report["verdict"], len(report["steps"]), report["champion"]) == (verdict, n_steps, v1 if version == v2 else v2)
        assert (folder / "canary.png").read_bytes()[:4] == b"\x89PNG"
    # a rolled-back version is never promoted again
    assert promote_newest_approved(cfg)["promoted"] is None

