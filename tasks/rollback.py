"""Rollback (on-call, from the Airflow rollback DAG's form): restore previous-champion or a version.

The restored version is redeployed with the rollout target first; only when that succeeded do
the aliases move back:
    champion          -> the restored version
    previous-champion -> what was champion before the restored one (its previous_champion_version
                         tag), or removed when unknown
and the version rolled back FROM gets rolled_back_at, rollback_reason, rolled_back_by (it keeps
deployed_at, so the promote DAG never rolls it out again). A failed rollout changes nothing.
"""

from __future__ import annotations

import logging

from onerec.errors import UserError
from tasks.model_artifacts import model_version, require_files
from tasks.promote import alias_version, rollout_options
from tasks.registry import CHAMPION, PREVIOUS, client, now_iso

log = logging.getLogger(__name__)


def rollback(cfg, reason: str, version: str | None = None, by: str = "unknown", mlflow_client=None) -> dict:
    if not reason or not reason.strip():
        raise UserError("a rollback needs a reason (it is recorded on the version)")
    c = mlflow_client or client(cfg)
    name = cfg.model_name
    current = alias_version(c, name, CHAMPION)
    target = str(version) if version else alias_version(c, name, PREVIOUS)
    if target is None:
        raise UserError(f"{name} has no {PREVIOUS} alias: give the version to restore explicitly")
    if target == current:
        raise UserError(f"version {target} is already the champion")
    mv = model_version(c, name, target)
    if mv.tags.get("gates") != "passed":
        raise UserError(f"version {target} did not pass the gates; refusing to deploy it")
    require_files(c, name, target)
    model_uri = f"models:/{name}/{target}"
    log.info("rolling back %s from version %s to %s (reason: %s, by %s)", name, current, target, reason, by)
    from ops import rollout as rollout_api

    if version:  # an explicit version: deploy exactly that one
        rollout = rollout_api.deploy(model_uri, target, target=cfg.rollout_target, **rollout_options(cfg))
    else:  # previous-champion: the target's own rollback (helm rollback / local restart of that version)
        rollout = rollout_api.rollback(cfg.rollout_target, model_uri, target, **rollout_options(cfg))
    c.set_registered_model_alias(name, CHAMPION, target)
    before = mv.tags.get("previous_champion_version")
    if before and before not in (target, current):
        c.set_registered_model_alias(name, PREVIOUS, before)
    elif alias_version(c, name, PREVIOUS) is not None:
        c.delete_registered_model_alias(name, PREVIOUS)
    c.set_model_version_tag(name, target, "helm_revision", str(rollout.get("revision", "")))
    if current:
        for key, value in (("rolled_back_at", now_iso()), ("rollback_reason", reason.strip()[:500]),
                           ("rolled_back_by", by)):
            c.set_model_version_tag(name, current, key, value)
    return {"champion": target, "rolled_back_from": current, "reason": reason, "by": by, "rollout": rollout}
