"""Approval: what an engineer decided in the MLflow UI, and expiry of stale candidates.

The approval is the version tag `approval=approved` (or `rejected`) that an engineer sets on the
version's page in the MLflow UI (the UI calls POST /api/2.0/mlflow/model-versions/set-tag).
Nothing in the pipeline approves. The promote DAG asks `approved_not_deployed` which versions
to roll out and calls `expire_stale` so that a forgotten candidate cannot be approved weeks
later by accident: a pending version older than `approval_max_age_hours` becomes
approval=expired and loses the challenger alias. A rejected challenger loses the alias too.
"""

from __future__ import annotations

import logging
import time

from tasks.registry import CHALLENGER, client, find_versions, now_iso

log = logging.getLogger(__name__)


def approved_not_deployed(cfg, mlflow_client=None) -> list[dict]:
    """Approved versions that passed the gates and were never deployed, newest first."""
    c = mlflow_client or client(cfg)
    out = []
    for v in find_versions(cfg, c, approval="approved", gates="passed"):
        if "deployed_at" in v.tags:
            continue
        out.append({"version": v.version, "checkpoint_sha256": v.tags.get("checkpoint_sha256"),
                    "created": v.creation_timestamp})
    return out


def _remove_alias_if_on(c, name: str, alias: str, version: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        current = c.get_model_version_by_alias(name, alias)
    except MlflowException:
        return False
    if current.version == str(version):
        c.delete_registered_model_alias(name, alias)
        return True
    return False


def expire_stale(cfg, mlflow_client=None, now_s: float | None = None) -> dict:
    """Pending versions older than approval_max_age_hours -> approval=expired, challenger alias removed.

    Rejected versions lose the challenger alias too. Returns {expired: [...], unaliased: [...]}.
    """
    c = mlflow_client or client(cfg)
    now_ms = (now_s if now_s is not None else time.time()) * 1000
    max_age_ms = cfg.approval_max_age_hours * 3600 * 1000
    expired, unaliased = [], []
    for v in find_versions(cfg, c, approval="pending"):
        if now_ms - v.creation_timestamp > max_age_ms:
            c.set_model_version_tag(cfg.model_name, v.version, "approval", "expired")
            c.set_model_version_tag(cfg.model_name, v.version, "expired_at", now_iso())
            _remove_alias_if_on(c, cfg.model_name, CHALLENGER, v.version)
            log.info("version %s was pending for more than %.0f h: approval=expired", v.version,
                     cfg.approval_max_age_hours)
            expired.append(v.version)
    for v in find_versions(cfg, c, approval="rejected"):
        if _remove_alias_if_on(c, cfg.model_name, CHALLENGER, v.version):
            log.info("version %s was rejected: challenger alias removed", v.version)
            unaliased.append(v.version)
    return {"expired": expired, "unaliased": unaliased}


def set_approval(cfg, version: str, decision: str, mlflow_client=None) -> None:
    """For tests and scripts only: the same tag the MLflow UI sets. Production approves in the UI."""
    if decision not in ("approved", "rejected"):
        raise ValueError(f"decision must be approved or rejected, not {decision!r}")
    (mlflow_client or client(cfg)).set_model_version_tag(cfg.model_name, str(version), "approval", decision)
