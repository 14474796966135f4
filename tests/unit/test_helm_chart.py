"""helm/onerec-serving through the real Helm engine (helm-python-sdk): lint, render, schema."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import helm_python as hp
import pytest
import yaml

from onerec.serve import server as serve_command
from onerec.serve.schemas import RecommendRequest

CHART = Path(__file__).resolve().parents[2] / "helm" / "onerec-serving"
MODEL = {"model": {"uri": "models:/onerec-v2-fp8/4", "version": "4"}}
SECRET_DATA = {"AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "s3cr3t/key+with=signs",
               "MLFLOW_TRACKING_USERNAME": "reader", "MLFLOW_TRACKING_PASSWORD": "pa55: 'quoted' \"value\""}

VALUE_SETS = {
    "defaults": {},
    "pinned-version": MODEL,
    "cpu-autoscaled": {
        **MODEL, "gpu": {"count": 0}, "autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 6},
        "podDisruptionBudget": {"enabled": True, "maxUnavailable": 1},
    },
    "h100-pool": {
        **MODEL, "gpu": {"count": 2}, "replicaCount": 4,
        "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "inference", "effect": "NoSchedule"}],
        "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
            "weight": 100, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                                               "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "onerec-serving"}}}}]}},
        "image": {"repository": "registry.example/onerec-serving", "tag": "0.1.0", "digest": "sha256:" + "a" * 64},
        "mlflow": {"trackingUri": "https://mlflow.internal", "s3EndpointUrl": "https://s3.internal"},
        "envSecret": {"name": "mlflow-s3"},  # an existing Secret, by reference
        "serviceAccount": {"create": True, "annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/onerec"}},
        "server": {"maxBatchSize": 128, "maxWaitMs": 2, "extraArgs": ["--access-log"]},
        "podDisruptionBudget": {"enabled": False},
    },
    "monitored-locked-down": {
        **MODEL, "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
        "networkPolicy": {"ingressNamespaces": ["monitoring", "ingress-nginx"], "egress": [
            {"to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}], "ports": [{"port": 443, "protocol": "TCP"}]}]},
    },
    "canary-autoscaled": {
        **MODEL, "autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 6},
        "canary": {"enabled": True, "weights": [10, 50, 100], "pauseSeconds": 300,
                   "analysis": {"maxErrorRateIncrease": 0.02, "maxP99Ratio": 1.25, "minP99IncreaseSeconds": 0.02,
                                "maxEmptyResultIncrease": 0.005}},
    },
    "env-secret-rendered": {
        **MODEL, "mlflow": {"s3EndpointUrl": "https://s3.internal"},
        "envSecret": {"create": True, "data": SECRET_DATA},
    },
}


def render(values: dict, name: str = "onerec") -> dict[str, dict]:
    """Rendered manifests by kind (one object per kind here), parsed from YAML."""
    with hp.Chart.load(CHART) as chart:
        out = chart.render(values, name=name, namespace="serving")
    objects = {}
    for path, text in out.items():
        if path.endswith("NOTES.txt"):
            objects["NOTES"] = text
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                key = "TestPod" if "tests/" in path else doc["kind"]
                if key == "Service" and doc["metadata"]["name"].endswith("-canary"):
                    key += "/canary"  # the canary Service beside the stable one
                assert key not in objects, f"two {key} objects"
                objects[key] = doc
    return objects


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_lint_strict_is_clean(name):
    report = hp.lint(CHART, VALUE_SETS[name], strict=True)
    assert report["errors"] == [] and report["messages"] == [], report


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_rendered_manifests(name):
    values = VALUE_SETS[name]
    with hp.Chart.load(CHART) as chart:
        merged = chart.merge_values(values)
    m = render(values)
    deployment, service, config = m["Deployment"], m["Service"], m["ConfigMap"]
    pod = deployment["spec"]["template"]
    spec = pod["spec"]
    (container,) = spec["containers"]

    # the command line is one the server accepts, with the model URI and version from the values
    parser = argparse.ArgumentParser()
    serve_command.add_arguments(parser)
    args = parser.parse_args(container["args"])
    assert container["command"] == ["onerec-fp8", "serve"]
    assert args.model_uri == merged["model"]["uri"]
    assert (args.model_version or "") == str(merged["model"]["version"])
    assert args.host == "0.0.0.0" and args.port == merged["server"]["port"]
    gpus = merged["gpu"]["count"]
    assert args.device == ("cuda" if gpus else "cpu")
    limits = container["resources"]["limits"]
    assert limits.get("nvidia.com/gpu") == (gpus or None)
    assert "nvidia.com/gpu" not in container["resources"].get("requests", {})

    # probes on the KServe v2 health endpoints
    assert container["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert spec["terminationGracePeriodSeconds"] > merged["server"]["drainSeconds"] + merged["server"]["gracefulTimeoutSeconds"]

    # non-root, read-only root filesystem, writable emptyDirs for /tmp and the model cache
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] > 0
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    mounts = {v["mountPath"]: v["name"] for v in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert {"/tmp", "/var/cache/onerec"} <= set(mounts)
    assert all("emptyDir" in volumes[n] for n in mounts.values())
    assert args.cache_dir.startswith("/var/cache/onerec")

    # scheduling knobs pass through
    assert spec.get("nodeSelector", {}) == merged["nodeSelector"]
    assert spec.get("tolerations", []) == merged["tolerations"]
    assert spec.get("affinity", {}) == merged["affinity"]
    image = merged["image"]
    assert container["image"] == (f"{image['repository']}@{image['digest']}" if image["digest"] else f"{image['repository']}:{image['tag']}")

    # MLflow settings reach the pod through the ConfigMap, the credentials through the env Secret
    assert config["data"]["MLFLOW_TRACKING_URI"] == merged["mlflow"]["trackingUri"]
    sources = container["envFrom"]
    assert {"configMapRef": {"name": config["metadata"]["name"]}} in sources
    check_env_secret(m, merged["envSecret"], sources)
    if merged["mlflow"]["s3EndpointUrl"]:
        assert config["data"]["MLFLOW_S3_ENDPOINT_URL"] == merged["mlflow"]["s3EndpointUrl"]

    # the Service selects exactly the server pods; the helm test pod is not one of them
    selector = service["spec"]["selector"]
    assert selector.items() <= pod["metadata"]["labels"].items()
    assert selector == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    test_pod = m["TestPod"]
    assert test_pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert not selector.items() <= test_pod["metadata"]["labels"].items()
    curl_args = test_pod["spec"]["containers"][0]["args"]
    RecommendRequest.model_validate_json(curl_args[curl_args.index("--data") + 1])  # a body the server accepts
    assert curl_args[-1] == f"http://{service['metadata']['name']}:{merged['service']['port']}/v1/recommend"
    assert test_pod["spec"]["securityContext"]["runAsNonRoot"] is True

    assert m["ServiceAccount"]["metadata"]["name"] == spec["serviceAccountName"]
    check_network_policy(m.get("NetworkPolicy"), merged["networkPolicy"], selector)
    if merged["metrics"]["serviceMonitor"]["enabled"]:
        monitor = m["ServiceMonitor"]
        assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
        (endpoint,) = monitor["spec"]["endpoints"]
        assert (endpoint["port"], endpoint["path"]) == (service["spec"]["ports"][0]["name"], "/metrics")
        assert merged["metrics"]["serviceMonitor"]["labels"].items() <= monitor["metadata"]["labels"].items()
    else:
        assert "ServiceMonitor" not in m
    if merged["canary"]["enabled"]:
        check_canary(m, merged)
    else:
        assert {"Rollout", "AnalysisTemplate", "Service/canary"}.isdisjoint(m)
    if merged["autoscaling"]["enabled"]:
        hpa = m["HorizontalPodAutoscaler"]
        assert "replicas" not in (m.get("Rollout") or deployment)["spec"]
        assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
        assert hpa["spec"]["scaleTargetRef"]["kind"] == ("Rollout" if merged["canary"]["enabled"] else "Deployment")
        assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 6)
        # on the requests each pod has in flight (the server's gauge), not on CPU
        (metric,) = hpa["spec"]["metrics"]
        assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "onerec_in_flight_requests"
        assert metric["pods"]["target"] == {"type": "AverageValue",
                                            "averageValue": str(merged["autoscaling"]["targetInFlightRequestsPerPod"])}
    else:
        assert "HorizontalPodAutoscaler" not in m
        assert (m.get("Rollout") or deployment)["spec"]["replicas"] == merged["replicaCount"]
    assert ("PodDisruptionBudget" in m) == merged["podDisruptionBudget"]["enabled"]
    if "PodDisruptionBudget" in m:
        assert m["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == selector
    assert merged["model"]["uri"] in m["NOTES"]
    watch = f"get rollout {deployment['metadata']['name']}" if merged["canary"]["enabled"] else "rollout status deployment/"
    assert watch in m["NOTES"]


def check_env_secret(m: dict, values: dict, sources: list[dict]) -> None:
    """Rendered from envSecret.data (base64, nowhere else in the release) or referenced by name; no
    Secret at all when neither is asked for."""
    import base64

    refs = [s["secretRef"]["name"] for s in sources if "secretRef" in s]
    if not values["create"]:
        assert "Secret" not in m
        assert refs == ([values["name"]] if values["name"] else [])
        return
    secret = m["Secret"]
    assert refs == [secret["metadata"]["name"]] and secret["type"] == "Opaque"
    assert {k: base64.b64decode(v).decode() for k, v in secret["data"].items()} == values["data"]
    others = yaml.safe_dump({k: v for k, v in m.items() if k != "Secret"})
    for value in values["data"].values():
        assert value not in others and base64.b64encode(value.encode()).decode() not in others


def check_network_policy(policy: dict | None, values: dict, selector: dict) -> None:
    """Ingress to the server pods only from their namespace and the listed ones, on the http port;
    egress open unless peers are listed (then DNS plus those)."""
    if not values["enabled"]:
        assert policy is None
        return
    assert policy["spec"]["podSelector"]["matchLabels"] == selector
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]
    namespaces = [p["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] for p in rule["from"]
                  if "namespaceSelector" in p]
    assert rule["from"][0] == {"podSelector": {}} and namespaces == values["ingressNamespaces"]
    if values["egress"]:
        assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
        dns, *rest = policy["spec"]["egress"]
        assert {p["port"] for p in dns["ports"]} == {53} and rest == values["egress"]
    else:
        assert policy["spec"]["policyTypes"] == ["Ingress"] and "egress" not in policy["spec"]


def check_canary(m: dict, merged: dict) -> None:
    """The Argo Rollout walks the configured weights over the Deployment's pods, judged by the
    AnalysisTemplate on the canary pods' series; the Deployment keeps no pods of its own."""
    rollout, analysis, deployment = m["Rollout"], m["AnalysisTemplate"], m["Deployment"]
    assert deployment["spec"]["replicas"] == 0
    assert rollout["spec"]["workloadRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                              "name": deployment["metadata"]["name"], "scaleDown": "never"}
    assert rollout["spec"]["selector"] == deployment["spec"]["selector"]
    canary = rollout["spec"]["strategy"]["canary"]
    assert canary["stableService"] == m["Service"]["metadata"]["name"]
    assert canary["canaryService"] == m["Service/canary"]["metadata"]["name"]
    assert m["Service/canary"]["spec"]["selector"] == m["Service"]["spec"]["selector"]
    weights = [w for w in merged["canary"]["weights"] if w < 100]
    assert canary["steps"] == [s for w in weights for s in (
        {"setWeight": w}, {"pause": {"duration": f"{merged['canary']['pauseSeconds']}s"}})]
    assert canary["analysis"]["templates"] == [{"templateName": analysis["metadata"]["name"]}]
    assert canary["analysis"]["args"] == [{"name": "canary-hash", "valueFrom": {"podTemplateHashValue": "Latest"}},
                                          {"name": "stable-hash", "valueFrom": {"podTemplateHashValue": "Stable"}}]
    metrics = {metric["name"]: metric for metric in analysis["spec"]["metrics"]}
    assert set(metrics) == {"error-rate", "p99-latency", "empty-results", "ready"}
    limits = merged["canary"]["analysis"]
    query = {name: metric["provider"]["prometheus"]["query"] for name, metric in metrics.items()}
    canary_pods, stable_pods = (f'{limits["podHashLabel"]}="{{{{args.{arg}}}}}"' for arg in ("canary-hash", "stable-hash"))
    # the canary pods against the stable pods, as the local canary judges (CanaryConfig)
    assert metrics["error-rate"]["successCondition"].endswith(f"<= {limits['maxErrorRateIncrease']}")
    assert metrics["empty-results"]["successCondition"].endswith(f"<= {limits['maxEmptyResultIncrease']}")
    for name in ("error-rate", "empty-results"):  # canary share minus the stable one (0 without stable traffic)
        canary_part, stable_part = query[name].split(" - on() ")
        assert canary_pods in canary_part and stable_pods not in canary_part
        assert stable_pods in stable_part and stable_part.endswith(">= 0) or on() vector(0))")
    # p99 over its allowance max(ratio x stable, stable + min increase): at most 1
    assert metrics["p99-latency"]["successCondition"].endswith("<= 1")
    canary_p99, allowance = query["p99-latency"].split(" / on() ")
    assert canary_pods in canary_p99 and stable_pods not in canary_p99
    assert f"* {limits['maxP99Ratio']})" in allowance and allowance.count(f"+ {limits['minP99IncreaseSeconds']})") == 2
    assert allowance.count(stable_pods) == 3 and canary_pods not in allowance
    # users answered with no item over users answered (the server's two counters, onerec.serve.app.Metrics)
    assert query["empty-results"].startswith("(sum(rate(onerec_empty_results_total{")
    assert ") / sum(rate(onerec_recommended_users_total{" in query["empty-results"]
    assert query["ready"] == f"min(onerec_ready{{{canary_pods}}})"
    for text in query.values():
        # the series the server exports (onerec.serve.app.Metrics), on the routes it labels
        assert any(name in text for name in ("onerec_http_responses_total", "onerec_request_duration_seconds_bucket",
                                             "onerec_empty_results_total", "onerec_ready"))
    # two backslashes in the PromQL string: the regex gets \{name\}, the literal route label (onerec.serve.app._route)
    assert r'"/v1/recommend|/v2/models/\\{name\\}/infer"' in metrics["error-rate"]["provider"]["prometheus"]["query"]


def test_a_new_model_version_or_config_changes_the_pod_template():
    a = render(MODEL)["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    b = render({"model": {"uri": "models:/onerec-v2-fp8/5", "version": "5"}})["Deployment"]["spec"]["template"]
    c = render({**MODEL, "mlflow": {"trackingUri": "https://other"}})["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert b["metadata"]["annotations"]["onerec.ai/model-version"] == "5" != a["onerec.ai/model-version"]
    assert c["checksum/config"] != a["checksum/config"]
    # a Secret the chart creates rolls the pods when its data changes; one it references cannot be watched
    assert "checksum/env-secret" not in a
    secret_of = lambda data: render({**MODEL, "envSecret": {"create": True, "data": data}})[  # noqa: E731
        "Deployment"]["spec"]["template"]["metadata"]["annotations"]
    d, e = secret_of(SECRET_DATA), secret_of({**SECRET_DATA, "AWS_SECRET_ACCESS_KEY": "rotated-key"})
    assert d["checksum/env-secret"] != e["checksum/env-secret"] and d["checksum/config"] == e["checksum/config"]


PROMQL_CHECK = Path(__file__).resolve().parents[1] / "promql" / "check.mjs"


def promql_syntax_errors(queries: list[str]) -> list[dict | None]:
    """Each query parsed by Prometheus' own PromQL grammar (@prometheus-io/lezer-promql, installed by
    `make`): None when it parses, else where the first syntax error is."""
    import shutil
    import subprocess

    node = shutil.which("node")
    if node is None or not (PROMQL_CHECK.parent / "node_modules").is_dir():
        pytest.fail("node and tests/promql/node_modules are needed: run `make install`")
    done = subprocess.run([node, str(PROMQL_CHECK)], input=json.dumps(queries), capture_output=True, text=True,
                          timeout=60, check=True)
    return json.loads(done.stdout)


def test_the_canary_analysis_queries_are_valid_promql():
    """What Argo sends to Prometheus: the rendered queries with the hash args as Argo fills them in."""
    analysis = render(VALUE_SETS["canary-autoscaled"])["AnalysisTemplate"]
    queries = [m["provider"]["prometheus"]["query"].replace("{{args.canary-hash}}", "6d4f9c7b8").replace(
        "{{args.stable-hash}}", "5c8b7a6f4") for m in analysis["spec"]["metrics"]]
    assert len(queries) == 4 and promql_syntax_errors(queries) == [None] * 4
    # the check itself sees a broken query: an unbalanced parenthesis, an operator with no operand
    broken = [queries[0].rsplit(")", 1)[0], queries[1] + " /"]
    assert all(error is not None for error in promql_syntax_errors(broken))


BAD_VALUES = {
    "negative replicas": {"replicaCount": -1},
    "autoscaling on CPU": {"autoscaling": {"enabled": True, "targetCPUUtilizationPercentage": 70}},
    "zero in-flight target": {"autoscaling": {"targetInFlightRequestsPerPod": 0}},
    "bad namespace name": {"networkPolicy": {"ingressNamespaces": ["Not_A_Namespace"]}},
    "canary weight above 100": {"canary": {"enabled": True, "weights": [50, 150]}},
    "canary prometheus not a URL": {"canary": {"analysis": {"prometheusAddress": "prometheus:9090"}}},
    "empty-result increase above 1": {"canary": {"analysis": {"maxEmptyResultIncrease": 1.5}}},
    "p99 ratio below 1": {"canary": {"analysis": {"maxP99Ratio": 0.9}}},
    "an absolute error-rate limit (not a key)": {"canary": {"analysis": {"maxErrorRate": 0.01}}},
    "env secret created without data": {"envSecret": {"create": True}},
    "env secret data not rendered": {"envSecret": {"name": "existing", "data": {"AWS_SECRET_ACCESS_KEY": "x"}}},
    "env secret key not a variable name": {"envSecret": {"create": True, "data": {"AWS-KEY": "x"}}},
    "env secret value not a string": {"envSecret": {"create": True, "data": {"PORT": 5000}}},
    "credentials under mlflow": {"mlflow": {"credentialsSecret": "mlflow-s3"}},
    "missing model uri": {"model": {"uri": None}},
    "empty model uri": {"model": {"uri": ""}},
    "model uri of another scheme": {"model": {"uri": "s3://bucket/model"}},
    "too many gpus": {"gpu": {"count": 9}},
    "gpu count as a string": {"gpu": {"count": "1"}},
    "negative gpus": {"gpu": {"count": -1}},
    "unknown key": {"replicas": 2},
    "mutable image tag": {"image": {"tag": "latest"}},
    "writable root filesystem": {"securityContext": {"readOnlyRootFilesystem": False}},
    "root user allowed": {"podSecurityContext": {"runAsNonRoot": False}},
    "bad service type": {"service": {"type": "ExternalName"}},
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_schema_rejects_bad_values(case):
    with pytest.raises(hp.HelmValuesError, match="onerec-serving"):
        render(BAD_VALUES[case])
    report = hp.lint(CHART, BAD_VALUES[case], strict=True)
    assert report["errors"], f"lint accepted {case}"


def test_schema_file_is_valid_json_schema():
    import jsonschema

    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    with hp.Chart.load(CHART) as chart:
        jsonschema.validate(chart.values, schema)  # the chart's own defaults pass


CRD_KINDS = {"Rollout", "AnalysisTemplate", "ServiceMonitor"}  # Argo Rollouts, Prometheus Operator: their own schemas


@pytest.mark.parametrize("kube_version", ["1.25.0", "1.37.0"])  # the oldest Chart.yaml admits, the newest known
@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_every_rendered_object_validates_against_the_kubernetes_schemas(name, kube_version):
    """Strict: an unknown field or a wrong type anywhere in a core object fails here, not at install."""
    import kubernetes_validate

    validated = set()
    for key, obj in render(VALUE_SETS[name]).items():
        if key == "NOTES" or obj["kind"] in CRD_KINDS:
            continue
        kubernetes_validate.validate(obj, kube_version, strict=True)
        validated.add(obj["kind"])
    assert {"Deployment", "Service", "ConfigMap", "ServiceAccount", "Pod", "NetworkPolicy"} <= validated
