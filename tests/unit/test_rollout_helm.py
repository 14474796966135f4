"""The helm rollout target through the real Helm engine (helm-python-sdk); no cluster runs here.

A dry run renders the release exactly as `helm upgrade --install` would (the pinned model URI and
version land in the Deployment); against an unreachable cluster the rollout and the rollback
fail with RolloutError, which the pipeline treats as "aliases unchanged".
"""

from __future__ import annotations

import pytest
import yaml

from onerec.settings import Settings
from ops import rollout
from ops.processes import free_port
from ops.rollout import helm


@pytest.fixture
def unreachable_kubeconfig(tmp_path, monkeypatch):
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": f"https://127.0.0.1:{free_port()}"}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
        "users": [{"name": "test", "user": {"token": "placeholder"}}],
    }))
    return str(path)


def test_dry_run_renders_the_pinned_version(unreachable_kubeconfig, monkeypatch):
    # the promote's configuration decides release, namespace and tracking URI, not this process's environment
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://not-this-one.example:5000")
    monkeypatch.setenv("ONEREC_HELM_RELEASE", "not-this-release")
    settings = Settings(rollout_target="helm", kubeconfig=unreachable_kubeconfig, helm_release="recs",
                        helm_namespace="serving", mlflow_tracking_uri="http://mlflow.example:5000")
    result = rollout.deploy(settings, "models:/onerec-v2-fp8@champion", 9, dry_run=True, digest="d" * 64)
    assert result["engine"] == "helm-python-sdk" and result["revision"] == 1 and result["dry_run"]
    assert result["model_uri"] == "models:/onerec-v2-fp8/9"  # an alias is pinned before it ships
    assert result["url"] == "http://recs-onerec-serving.serving.svc.cluster.local"
    docs = {d["kind"]: d for d in yaml.safe_load_all(result["manifest"]) if d}
    args = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--model-uri=models:/onerec-v2-fp8/9" in args and "--model-version=9" in args
    assert f"--model-digest={'d' * 64}" in args  # the pods load only the signed bytes
    assert docs["ConfigMap"]["data"]["MLFLOW_TRACKING_URI"] == "http://mlflow.example:5000"


def test_failed_rollout_and_rollback_raise(unreachable_kubeconfig):
    settings = Settings(rollout_target="helm", kubeconfig=unreachable_kubeconfig)
    with pytest.raises(rollout.RolloutError, match="unreachable"):
        rollout.deploy(settings, "models:/onerec-v2-fp8/3", "3", timeout_s=30)
    with pytest.raises(rollout.RolloutError, match="unreachable"):
        rollout.rollback(settings)
    with pytest.raises(rollout.RolloutError):
        rollout.status(settings)


def test_previous_good_revision_skips_failed_ones():
    history = [
        {"revision": 1, "status": "superseded"},
        {"revision": 2, "status": "superseded"},
        {"revision": 3, "status": "failed"},
        {"revision": 4, "status": "deployed"},
    ]
    assert helm._previous_good(history, 4) == 2
    with pytest.raises(rollout.RolloutError):
        helm._previous_good(history[2:], 4)


def test_dry_run_with_the_canary_and_a_rendered_secret(unreachable_kubeconfig, tmp_path):
    """The values files turn on the chart's canary (promote then waits for the Rollout's verdict);
    the returned manifest carries no secret value."""
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"canary": {"enabled": True},
                                      "envSecret": {"create": True, "data": {"MLFLOW_TRACKING_PASSWORD": "hunter2-x"}}}))
    settings = Settings(rollout_target="helm", kubeconfig=unreachable_kubeconfig, helm_release="recs",
                        helm_namespace="serving", helm_values=str(values))
    assert helm.canary_enabled(settings) and not helm.canary_enabled(Settings(rollout_target="helm"))
    result = rollout.deploy(settings, "models:/onerec-v2-fp8/9", 9, dry_run=True, digest="d" * 64)
    assert result["canary"] is True and result["rollout"] == "recs-onerec-serving"
    docs = {d["kind"]: d for d in yaml.safe_load_all(result["manifest"]) if d}
    assert docs["Rollout"]["metadata"]["name"] == result["rollout"]
    assert docs["Secret"]["data"] == {"MLFLOW_TRACKING_PASSWORD": "(redacted)"}
    assert "hunter2" not in result["manifest"] and "aHVudGVyMi" not in result["manifest"]  # nor its base64


def test_the_rollout_verdict_against_an_unreachable_cluster_times_out(unreachable_kubeconfig):
    """The real Kubernetes client from the promote's kubeconfig: an API that does not answer is no
    verdict, polled again until the timeout, which the promote treats as a failure."""
    from ops.rollout import argo

    api = argo.rollouts_api(Settings(rollout_target="helm", kubeconfig=unreachable_kubeconfig))
    assert api.api_client.configuration.host.startswith("https://127.0.0.1:")
    assert argo.current_pod_hash(api, "serving", "recs-onerec-serving") is None
    result = argo.wait_for_verdict(api, "serving", "recs-onerec-serving", timeout_s=1, poll_s=0.2)
    assert result["verdict"] == "timeout" and "the Kubernetes API did not answer" in result["message"]
