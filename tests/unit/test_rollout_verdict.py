"""The helm target's canary verdict: the promote waits for the chart's Argo Rollout (read through a
fake Kubernetes API here: no cluster runs on this machine) and records, rolls back and notifies as
the local canary does. The helm upgrade and rollback themselves are tests/unit/test_rollout_helm.py's."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

import tasks.canary as canary
from ops.rollout import argo
from ops.rollout.canary import CanaryConfig
from tasks.errors import StepFailed

NAMESPACE, RELEASE, ROLLOUT = "serving", "recs", "recs-onerec-serving"


class NotFound(Exception):
    status = 404  # as kubernetes.client.ApiException carries it


class FakeRollouts:
    """kubernetes.client.CustomObjectsApi's read of one Rollout: each read returns the next status
    (the last one repeats); None stands for 404."""

    def __init__(self, *statuses):
        self.statuses, self.reads = list(statuses), []

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.reads.append((group, version, namespace, plural, name))
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        if status is None:
            raise NotFound()
        return {"kind": "Rollout", "metadata": {"name": name}, "status": status}


def status(phase, pod_hash, stable=None, abort=False, message=""):
    return {"phase": phase, "currentPodHash": pod_hash, "stableRS": stable or pod_hash, "abort": abort,
            "message": message, "currentStepIndex": 1}


class FakeRegistry:
    def __init__(self):
        self.tags, self.artifacts = {}, []

    def set_model_version_tag(self, name, version, key, value):
        self.tags[key] = value

    def get_model_version(self, name, version):
        return SimpleNamespace(run_id="run1")

    def log_artifact(self, run_id, path, folder):
        self.artifacts.append(f"{folder}/{path.rsplit('/', 1)[-1]}")


@pytest.fixture
def promote_env(monkeypatch, tmp_path):
    """The helm rollout, state records and notifier of tasks/canary.py, recorded instead of done."""
    calls = {"deploy": [], "rollback": [], "transition": [], "mail": []}
    monkeypatch.setattr(canary.rollout_api, "deploy", lambda cfg, uri, version, digest=None: calls["deploy"].append(
        (uri, version, digest)) or {"target": "helm", "revision": 8, "canary": True, "rollout": ROLLOUT})
    monkeypatch.setattr(canary.rollout_api, "rollback", lambda cfg: calls["rollback"].append(cfg.helm_release) or
                        {"revision": 9, "rolled_back_to": 7})
    monkeypatch.setattr(canary, "transition", lambda cfg, c, version, state, by, note: calls["transition"].append(
        (version, state, by, note)))
    monkeypatch.setattr(canary, "send_failure", lambda subject, body, cfg: calls["mail"].append((subject, body)))
    monkeypatch.setattr(argo.time, "sleep", lambda s: None)
    cfg = SimpleNamespace(model_name="onerec-v2-fp8", helm_release=RELEASE, helm_namespace=NAMESPACE,
                          canary=CanaryConfig(poll_s=0.01, rollout_timeout_s=0.3))
    return cfg, FakeRegistry(), calls


def test_a_healthy_rollout_on_the_new_pods_passes(promote_env):
    cfg, c, calls = promote_env
    # before the upgrade: Healthy on the champion's pods; then the new pods walk and become stable
    api = FakeRollouts(status("Healthy", "old"), status("Healthy", "old"), status("Progressing", "new", stable="old"),
                       status("Paused", "new", stable="old"), status("Healthy", "new"))
    result = canary.judge_rollout(cfg, c, "5", "models:/onerec-v2-fp8/5", "d" * 64, "4", api=api)
    assert result["canary"]["verdict"] == "passed" and result["revision"] == 8
    assert calls["deploy"] == [("models:/onerec-v2-fp8/5", "5", "d" * 64)]
    assert calls["rollback"] == calls["transition"] == calls["mail"] == []
    assert c.tags[canary.VERDICT_TAG] == "passed"
    step = json.loads(c.tags["canary_step_1"])
    assert (step["argo"], step["rollout"], step["helm_revision"]) == ("healthy", f"{NAMESPACE}/{ROLLOUT}", 8)
    assert c.artifacts == ["reports/canary.json"] and c.tags[canary.REPORT_TAG] == "runs:/run1/reports/canary.json"
    assert {r[-1] for r in api.reads} == {ROLLOUT} and api.reads[0][:4] == ("argoproj.io", "v1alpha1", NAMESPACE, "rollouts")
    assert len(api.reads) == 5  # the stale Healthy on the old pods right after the upgrade was no verdict


def test_an_aborted_rollout_is_rolled_back_marked_and_notified(promote_env):
    cfg, c, calls = promote_env
    api = FakeRollouts(status("Healthy", "old"), status("Progressing", "new", stable="old"),
                       status("Degraded", "new", stable="old", abort=True,
                              message="RolloutAborted: metric \"empty-results\" assessed Failed"))
    with pytest.raises(StepFailed, match="canary failed at the Rollout serving/recs-onerec-serving: the Rollout was "
                                         "aborted .*empty-results.*champion 4 serves all traffic again"):
        canary.judge_rollout(cfg, c, "5", "models:/onerec-v2-fp8/5", None, "4", api=api)
    assert calls["rollback"] == [RELEASE]
    (version, state, by, note), = calls["transition"]
    assert (version, state, by) == ("5", "rolled_back", "canary") and "empty-results" in note
    assert c.tags[canary.VERDICT_TAG] == "failed" and "aborted" in c.tags[canary.REASON_TAG]
    (subject, body), = calls["mail"]
    assert subject.startswith("[onerec-fp8] canary of onerec-v2-fp8 version 5 rolled back")
    assert "champion 4 serves all traffic again" in body and "empty-results" in body


def test_no_verdict_in_time_rolls_back_with_a_clear_message(promote_env):
    cfg, c, calls = promote_env
    api = FakeRollouts(status("Healthy", "old"), status("Paused", "new", stable="old"))
    with pytest.raises(StepFailed, match=r"canary inconclusive .*no verdict from the Rollout "
                                         r"serving/recs-onerec-serving within 0 s \(last: phase Paused, step 1\)"):
        canary.judge_rollout(cfg, c, "5", "models:/onerec-v2-fp8/5", None, "4", api=api)
    assert calls["rollback"] == [RELEASE] and calls["transition"][0][1] == "rolled_back" and len(calls["mail"]) == 1
    assert c.tags[canary.VERDICT_TAG] == "inconclusive"


def test_a_failed_helm_rollback_is_said_in_the_verdict(promote_env, monkeypatch):
    cfg, c, calls = promote_env

    def rollback(cfg):
        raise canary.RolloutError("helm rollback of recs failed: cluster unreachable")

    monkeypatch.setattr(canary.rollout_api, "rollback", rollback)
    api = FakeRollouts(None, status("Degraded", "new", stable="old", message="ProgressDeadlineExceeded"))
    with pytest.raises(StepFailed, match="the rollback failed too .*cluster unreachable.*check what serves"):
        canary.judge_rollout(cfg, c, "5", "models:/onerec-v2-fp8/5", None, "4", api=api)
    (subject, body), = calls["mail"]
    assert "rollback FAILED" in body and calls["transition"][0][1] == "rolled_back"


@pytest.mark.parametrize(("rollout", "previous", "verdict"), [
    (None, None, None),
    ({"status": status("Healthy", "a")}, None, "healthy"),  # the first install: no canary steps to walk
    ({"status": status("Healthy", "a")}, "a", None),  # the old pods: the controller has not seen the upgrade yet
    ({"status": status("Healthy", "b", stable="a")}, "a", None),
    ({"status": status("Paused", "b", stable="a", abort=True)}, "a", "aborted"),
    ({"status": status("Degraded", "b", stable="a")}, "a", "degraded"),
    ({}, "a", None),
])
def test_one_reading_of_the_rollout(rollout, previous, verdict):
    assert argo.verdict_of(rollout, previous)[0] == verdict


def analysis_run(pod_hash: str, error_rates: list[str], error_phases: list[str], created: str = "2026-12-04T10:00:00Z"):
    """A background AnalysisRun as the Argo controller writes it (argoproj.io/v1alpha1): the chart's
    metrics with their successConditions (error rate over the stable pods', p99 over its allowance),
    each metric's measurements as strings ("[0.01]", "[NaN]")."""
    def result(name, values, phases):
        failed = phases.count("Failed")
        return {"name": name, "phase": "Failed" if failed else "Successful", "count": len(values),
                "successful": phases.count("Successful"), "failed": failed,
                "measurements": [{"phase": p, "value": v, "startedAt": f"2026-12-04T10:0{i}:00Z",
                                  "finishedAt": f"2026-12-04T10:0{i}:01Z"} for i, (v, p) in enumerate(zip(values, phases, strict=True))]}

    return {"kind": "AnalysisRun", "metadata": {
        "name": f"recs-onerec-serving-{pod_hash}-1", "creationTimestamp": created,
        "labels": {"rollouts-pod-template-hash": pod_hash, "rollout-type": "Background"}},
        "spec": {"metrics": [
            {"name": "error-rate", "successCondition": "isNaN(result[0]) || result[0] <= 0.01"},
            {"name": "p99-latency", "successCondition": "isNaN(result[0]) || result[0] <= 1"},
            {"name": "ready", "successCondition": "len(result) > 0 && result[0] >= 1"}]},
        "status": {"phase": "Failed" if "Failed" in error_phases else "Successful", "metricResults": [
            result("error-rate", error_rates, error_phases),
            result("p99-latency", ["[0.71]", "[NaN]", "[0.83]"], ["Successful"] * 3),
            result("ready", ["[1]", "[1]", "[1]"], ["Successful"] * 3)]}}


class FakeRolloutsWithAnalysis(FakeRollouts):
    """Also lists AnalysisRuns by label selector, as CustomObjectsApi.list_namespaced_custom_object does."""

    def __init__(self, runs, *statuses):
        super().__init__(*statuses)
        self.runs, self.selectors = runs, []

    def list_namespaced_custom_object(self, group, version, namespace, plural, label_selector):
        assert (group, version, namespace, plural) == ("argoproj.io", "v1alpha1", NAMESPACE, "analysisruns")
        self.selectors.append(label_selector)
        wanted = dict(pair.split("=") for pair in label_selector.split(","))
        return {"items": [r for r in self.runs if wanted.items() <= r["metadata"]["labels"].items()]}


def test_the_verdict_comes_with_the_analysis_figures_and_their_plot(promote_env, monkeypatch, tmp_path):
    """The canary pods' AnalysisRun (not the champion's) is read, parsed and drawn; its limits come
    from the successConditions, NaN (no traffic) is no value."""
    cfg, c, calls = promote_env
    stored = {}
    monkeypatch.setattr(c, "log_artifact", lambda run_id, path, folder: stored.update(
        {f"{folder}/{path.rsplit('/', 1)[-1]}": Path(path).read_bytes()}))
    runs = [analysis_run("old", ["[0.5]"], ["Failed"], created="2026-12-01T00:00:00Z"),
            analysis_run("new", ["[0.002]", "[NaN]", "[0.04]"], ["Successful", "Successful", "Failed"])]
    api = FakeRolloutsWithAnalysis(runs, status("Healthy", "old"), status("Progressing", "new", stable="old"),
                                   status("Degraded", "new", stable="old", abort=True,
                                          message='RolloutAborted: metric "error-rate" assessed Failed'))
    with pytest.raises(StepFailed, match="error-rate"):
        canary.judge_rollout(cfg, c, "5", "models:/onerec-v2-fp8/5", None, "4", api=api)
    assert api.selectors == ["rollouts-pod-template-hash=new,rollout-type=Background"]
    assert set(stored) == {"reports/canary.json", "reports/canary.png"} and stored["reports/canary.png"][:4] == b"\x89PNG"
    assert c.tags[canary.REPORT_TAG] == "runs:/run1/reports/canary.png"
    analysis = {m["name"]: m for m in json.loads(stored["reports/canary.json"])["analysis"]}
    error = analysis["error-rate"]
    assert (error["phase"], error["limit"], error["count"], error["failed"]) == ("Failed", ["<=", 0.01], 3, 1)
    assert [m["value"] for m in error["measurements"]] == [0.002, None, 0.04]
    assert analysis["ready"]["limit"] == [">=", 1.0] and analysis["p99-latency"]["limit"] == ["<=", 1.0]
    assert "error-rate" in calls["mail"][0][1]


def test_unreadable_analysis_runs_leave_the_verdict_and_its_json(promote_env):
    cfg, c, calls = promote_env

    class Forbidden(FakeRollouts):
        def list_namespaced_custom_object(self, *args, **kwargs):
            raise PermissionError("analysisruns is forbidden")

    api = Forbidden(status("Healthy", "old"), status("Healthy", "new"))
    assert canary.judge_rollout(cfg, c, "5", "models:/onerec-v2-fp8/5", None, "4", api=api)["canary"]["verdict"] == "passed"
    assert c.artifacts == ["reports/canary.json"]


@pytest.mark.parametrize(("text", "value"), [
    ("[0.012]", 0.012), ("0.5", 0.5), ("[NaN]", None), ("[]", None), (None, None), ("[1, 2]", 1.0), ("garbage", None)])
def test_a_measurement_as_argo_stores_it(text, value):
    assert argo.measured_value(text) == value
