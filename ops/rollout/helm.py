"""The helm rollout target (production): the chart helm/onerec-serving through the Helm engine as a library.

deploy = `helm upgrade --install` with model.uri/model.version/model.digest set (the pods load
only bytes that hash to the signed digest; `helm rollback` restores a revision's digest with it), rolling back by itself on
failure, waiting for the rollout, with a timeout; returns the release revision. rollback =
`helm rollback` to the last revision before the current one that was deployed successfully.
One engine: helm-python-sdk (the Helm v4 engine, in the `[pipeline]` extra), so no helm binary
and no version-dependent flags are needed in the Airflow image. The caller's Settings give the
release (helm_release), namespace (helm_namespace), values files (helm_values, os.pathsep-separated),
kube_context, kubeconfig and the tracking URI the pods use; options: timeout_s, chart, dry_run
(render and validate, touch no cluster). With the chart's canary (values canary.enabled,
`canary_enabled`) the upgrade returns once the objects are applied while Argo Rollouts walks the
steps; the promote then waits for the Rollout's verdict (ops/rollout/argo.py, tasks/canary.py).
A dry run's manifest comes back with every Secret's values replaced.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from onerec.settings import Settings
from ops.rollout.base import RolloutError

log = logging.getLogger(__name__)

# package data: ops/rollout/charts links to the repository's helm/ and the wheel carries the chart,
# so an installed pipeline (the Airflow image) finds it beside this module
CHART = Path(__file__).resolve().parent / "charts" / "onerec-serving"


def _options(settings: Settings, timeout_s: float = 600, chart: str | Path | None = None, dry_run: bool = False) -> dict:
    return {
        "release": settings.helm_release,
        "namespace": settings.helm_namespace,
        "values_files": [f for f in settings.helm_values.split(os.pathsep) if f],
        "kube_context": settings.kube_context,
        "kubeconfig": settings.kubeconfig,
        "timeout_s": int(timeout_s),
        "chart": str(chart or CHART),
        "dry_run": bool(dry_run),
        "tracking_uri": settings.mlflow_tracking_uri,
    }


def _model_values(model_uri: str, version: str, digest: str | None, tracking_uri: str | None) -> dict:
    values = {"model": {"uri": model_uri, "version": version, **({"digest": digest} if digest else {})}}
    if tracking_uri:
        values["mlflow"] = {"trackingUri": tracking_uri}
    return values


def fullname(release: str) -> str:
    """The chart's name for its objects (Deployment, Service, Rollout) in `release`."""
    name = release if "onerec-serving" in release else f"{release}-onerec-serving"
    return name[:63].rstrip("-")


def _service_url(release: str, namespace: str) -> str:
    return f"http://{fullname(release)}.{namespace}.svc.cluster.local"


def values_files(settings: Settings) -> dict:
    """The release's values from settings.helm_values, merged in order (the chart's defaults below them)."""
    import yaml  # optional: PyYAML

    values: dict = {}
    for f in _options(settings)["values_files"]:
        values = _deep_merge(values, yaml.safe_load(Path(f).read_text()) or {})
    return values


def canary_enabled(settings: Settings, values: dict | None = None) -> bool:
    """Whether the release's values (default: its values files) turn on the chart's Argo Rollouts
    canary (canary.enabled)."""
    values = values_files(settings) if values is None else values
    return bool((values.get("canary") or {}).get("enabled"))


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@contextlib.contextmanager
def _helm(o: dict, action: str):
    """The Helm engine for these options; its errors become one RolloutError naming the action."""
    import helm_python as hp  # optional: the Helm SDK ([pipeline])

    try:
        with hp.Config(kubeconfig_path=o["kubeconfig"], kube_context=o["kube_context"], namespace=o["namespace"],
                       storage_driver="memory" if o["dry_run"] else None) as cfg:
            yield hp, cfg
    except hp.HelmError as exc:
        raise RolloutError(f"helm {action} of {o['release']} failed: {exc}") from None


def _status_of(entry: dict) -> str:
    info = entry.get("info")
    return str((info or {}).get("status") if isinstance(info, dict) else entry.get("status", "")).lower()


def _revision_of(entry: dict) -> int:
    return int(entry.get("revision", entry.get("version", 0)))


def _previous_good(history: list[dict], current: int) -> int:
    """The newest revision before `current` that was deployed successfully (superseded since)."""
    good = [_revision_of(h) for h in history if _revision_of(h) < current and _status_of(h) in ("superseded", "deployed")]
    if not good:
        raise RolloutError(f"nothing to roll back to: no successful revision before {current}")
    return max(good)


def deploy(settings: Settings, model_uri: str, version: str, digest: str | None = None, **options) -> dict:
    o = _options(settings, **options)
    values = _deep_merge(values_files(settings), _model_values(model_uri, version, digest, o["tracking_uri"]))
    with _helm(o, "upgrade --install") as (hp, cfg), hp.Chart.load(o["chart"]) as chart:
        if o["dry_run"]:
            release = cfg.install(chart, o["release"], values, namespace=o["namespace"], dry_run="client")
        else:
            try:
                cfg.history(o["release"])
                exists = True
            except hp.HelmNotFoundError:
                exists = False
            common = dict(namespace=o["namespace"], timeout=o["timeout_s"], wait="watcher", rollback_on_failure=True)
            if exists:
                release = cfg.upgrade(chart, o["release"], values, **common)
            else:
                release = cfg.install(chart, o["release"], values, create_namespace=True, **common)
    revision = _revision_of(release)
    log.info("helm release %s revision %d serves version %s%s", o["release"], revision, version,
             " (dry run)" if o["dry_run"] else "")
    result = {
        "target": "helm", "engine": "helm-python-sdk", "release": o["release"], "namespace": o["namespace"],
        "revision": revision, "version": version, "model_uri": model_uri, "url": _service_url(o["release"], o["namespace"]),
        "canary": canary_enabled(settings, values), "rollout": fullname(o["release"]),
    }
    if o["dry_run"]:
        result.update(dry_run=True, manifest=_without_secret_values(release.get("manifest", "")))
    return result


def _without_secret_values(manifest: str) -> str:
    """The rendered manifest with every Secret's values replaced (a dry run's result may be printed)."""
    import yaml  # optional: PyYAML

    docs = [d for d in yaml.safe_load_all(manifest) if d]
    for doc in docs:
        if doc.get("kind") == "Secret":
            for field in ("data", "stringData"):
                if doc.get(field):
                    doc[field] = dict.fromkeys(doc[field], "(redacted)")
    return yaml.safe_dump_all(docs, sort_keys=False)


def rollback(settings: Settings, revision: int | None = None, **options) -> dict:
    o = _options(settings, **options)
    with _helm(o, "rollback") as (_, cfg):
        history = cfg.history(o["release"])
        current = max(_revision_of(h) for h in history if _status_of(h) == "deployed")
        to = revision or _previous_good(history, current)
        cfg.rollback(o["release"], version=to, timeout=o["timeout_s"], wait="watcher")
        new = cfg.status(o["release"])
        values = cfg.get_values(o["release"])
    model = (values or {}).get("model", {})
    return {
        "target": "helm", "release": o["release"], "namespace": o["namespace"], "revision": _revision_of(new),
        "rolled_back_from": current, "rolled_back_to": to, "version": model.get("version"),
        "model_uri": model.get("uri"), "url": _service_url(o["release"], o["namespace"]),
    }


def status(settings: Settings, **options) -> dict:
    o = _options(settings, **options)
    with _helm(o, "status") as (_, cfg):
        release = cfg.status(o["release"])
    return {"target": "helm", "release": o["release"], "namespace": o["namespace"],
            "revision": _revision_of(release), "status": _status_of(release)}
