"""The verdict of the chart's Argo Rollouts canary, read from its Rollout object through the Kubernetes API.

With `canary.enabled` the chart (helm/onerec-serving/templates/rollout.yaml) renders a Rollout
that walks the weights while its AnalysisTemplate judges the canary pods; `helm upgrade` returns
before that walk ends. `wait_for_verdict` polls the Rollout (argoproj.io/v1alpha1, rollouts)
until Argo decides:

    healthy   status.phase Healthy on the new pods (their template hash is the stable one)
    aborted   status.abort true (a failed analysis, or someone aborted it)
    degraded  status.phase Degraded
    timeout   neither within timeout_s

`analysis_of` reads the figures behind the verdict: the background AnalysisRun(s) Argo ran for the
new pods (labels rollouts-pod-template-hash and rollout-type=Background), each metric's
measurements with their phases and the limit of its successCondition.

Every function takes the API object (kubernetes.client.CustomObjectsApi, or anything with its
get_namespaced_custom_object), so a test can pass a fake; `rollouts_api` builds the real one from
the caller's Settings (kubeconfig, kube_context; in a pod without a kubeconfig: its service account).
"""

from __future__ import annotations

import logging
import math
import os
import re
import time

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL = "argoproj.io", "v1alpha1", "rollouts"
ANALYSIS_RUNS = "analysisruns"
# the limit in the chart's successConditions ("isNaN(result[0]) || result[0] <= 0.01")
LIMIT = re.compile(r"result\[0\]\s*(<=|>=)\s*([-+0-9.eE]+)")
PROGRESS_EVERY_S = 60.0  # a log line at least this often while the Rollout walks


def rollouts_api(settings):
    """kubernetes.client.CustomObjectsApi for settings.kubeconfig/kube_context, or the pod's service account."""
    from kubernetes import client, config  # optional: the Kubernetes client (Airflow's cncf provider)

    if settings.kubeconfig or not os.environ.get("KUBERNETES_SERVICE_HOST"):
        api_client = config.new_client_from_config(config_file=settings.kubeconfig or None,
                                                   context=settings.kube_context or None)
    else:
        configuration = client.Configuration()
        config.load_incluster_config(client_configuration=configuration)
        api_client = client.ApiClient(configuration)
    return client.CustomObjectsApi(api_client)


def read_rollout(api, namespace: str, name: str) -> dict | None:
    """The Rollout object, or None when it does not exist (any other API error raises)."""
    try:
        return api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except Exception as exc:  # kubernetes.client.ApiException: imported only where the client is
        if getattr(exc, "status", None) == 404:
            return None
        raise


def pod_hash_of(rollout: dict | None) -> str | None:
    """The pod template hash a reading of the Rollout names as current (None: no Rollout or status)."""
    return ((rollout or {}).get("status") or {}).get("currentPodHash")


def current_pod_hash(api, namespace: str, name: str) -> str | None:
    """The pod template hash the Rollout serves now (None: no Rollout yet, or unreadable): read
    before an upgrade so that the verdict is about the new pods, not the old Healthy state."""
    try:
        rollout = read_rollout(api, namespace, name)
    except Exception as exc:
        log.warning("could not read the Rollout %s/%s before the upgrade: %s", namespace, name, exc)
        return None
    return pod_hash_of(rollout)


def verdict_of(rollout: dict | None, previous_hash: str | None) -> tuple[str | None, str]:
    """(verdict or None while undecided, what the Rollout says) for one reading of the object."""
    if rollout is None:
        return None, "the Rollout does not exist (yet)"
    status = rollout.get("status") or {}
    phase, message = status.get("phase"), status.get("message") or ""
    where = f"phase {phase}, step {status.get('currentStepIndex')}" + (f": {message}" if message else "")
    if status.get("abort"):
        return "aborted", f"the Rollout was aborted ({where})"
    if phase == "Degraded":
        return "degraded", f"the Rollout is degraded ({where})"
    current = pod_hash_of(rollout)
    if phase == "Healthy" and current and status.get("stableRS") == current and current != previous_hash:
        return "healthy", f"the Rollout is healthy on pods {current}"
    return None, where


def wait_for_verdict(api, namespace: str, name: str, timeout_s: float, poll_s: float = 5.0,
                     previous_hash: str | None = None, clock=time.monotonic, sleep=time.sleep) -> dict:
    """Poll the Rollout until Argo's verdict (module doc) or `timeout_s`; returns {verdict, message,
    seconds, polls, pod_hash: the new pods' template hash as last read}. An API error while polling is
    logged and polled again (the timeout bounds it)."""
    started = last_log = clock()
    said, polls, pod_hash = None, 0, None
    while True:
        polls += 1
        try:
            rollout = read_rollout(api, namespace, name)
            verdict, message = verdict_of(rollout, previous_hash)
            pod_hash = pod_hash_of(rollout) or pod_hash
        except Exception as exc:
            verdict, message = None, f"the Kubernetes API did not answer: {exc}"
        elapsed = clock() - started
        if verdict is not None:
            log.info("Rollout %s/%s after %.0f s: %s", namespace, name, elapsed, message)
            return {"verdict": verdict, "message": message, "seconds": round(elapsed, 1), "polls": polls,
                    "pod_hash": pod_hash}
        if elapsed >= timeout_s:
            message = f"no verdict from the Rollout {namespace}/{name} within {timeout_s:.0f} s (last: {message})"
            log.error(message)
            return {"verdict": "timeout", "message": message, "seconds": round(elapsed, 1), "polls": polls,
                    "pod_hash": pod_hash}
        if message != said or clock() - last_log >= PROGRESS_EVERY_S:
            log.info("waiting for the Rollout %s/%s (%.0f of %.0f s): %s", namespace, name, elapsed, timeout_s, message)
            said, last_log = message, clock()
        sleep(poll_s)


def analysis_of(api, namespace: str, pod_hash: str) -> list[dict]:
    """Each metric the background AnalysisRun(s) of pods `pod_hash` measured, in run order:
    {name, phase, count, successful, failed, inconclusive, error, condition, limit: [op, value] or
    None, measurements: [{at, value (None: NaN, i.e. no traffic), phase}]}."""
    runs = api.list_namespaced_custom_object(
        GROUP, VERSION, namespace, ANALYSIS_RUNS,
        label_selector=f"rollouts-pod-template-hash={pod_hash},rollout-type=Background").get("items") or []
    runs.sort(key=lambda r: (r.get("metadata") or {}).get("creationTimestamp") or "")
    metrics = []
    for run in runs:
        conditions = {m.get("name"): m.get("successCondition") or "" for m in (run.get("spec") or {}).get("metrics") or []}
        for result in (run.get("status") or {}).get("metricResults") or []:
            condition = conditions.get(result.get("name"), "")
            limit = LIMIT.search(condition)
            metrics.append({
                "name": result.get("name"), "phase": result.get("phase"), "condition": condition,
                "limit": [limit.group(1), float(limit.group(2))] if limit else None,
                **{k: int(result.get(k) or 0) for k in ("count", "successful", "failed", "inconclusive", "error")},
                "measurements": [{"at": m.get("finishedAt") or m.get("startedAt"), "value": measured_value(m.get("value")),
                                  "phase": m.get("phase")} for m in result.get("measurements") or []],
            })
    return metrics


def measured_value(text: str | None) -> float | None:
    """A Prometheus measurement as Argo stores it ("0.012", "[0.012]", "[NaN]", "[]"): its first
    number, None where there is none or it is NaN (no requests in the window)."""
    first = (text or "").strip().strip("[]").split(",")[0].strip()
    try:
        value = float(first)
    except ValueError:
        return None
    return None if math.isnan(value) else value
