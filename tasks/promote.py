"""Promote: roll out an approved version, then move the aliases (only after the rollout succeeded).

    champion          -> the promoted version
    previous-champion -> the version that was champion before (what rollback restores)
    challenger        -> removed when it pointed at the promoted version
    version tags      deployed_at, helm_revision, previous_champion_version

A failed rollout raises and leaves every alias and tag as it was.
"""

from __future__ import annotations

import logging

from onerec.errors import UserError
from tasks.model_artifacts import model_version, require_files
from tasks.registry import CHALLENGER, CHAMPION, PREVIOUS, client, now_iso

log = logging.getLogger(__name__)


def rollout_options(cfg) -> dict:
    """Options for ops.rollout: the local target keeps its state in our state dir."""
    return {"state_dir": cfg.state_dir} if cfg.rollout_target == "local" else {}


def alias_version(c, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return c.get_model_version_by_alias(name, alias).version
    except MlflowException:
        return None


def promote(cfg, version: str, mlflow_client=None) -> dict:
    """Deploy `version` with the configured rollout target, then move champion/previous-champion."""
    c = mlflow_client or client(cfg)
    name, version = cfg.model_name, str(version)
    mv = model_version(c, name, version)
    if mv.tags.get("approval") != "approved" or mv.tags.get("gates") != "passed":
        raise UserError(f"{name} version {version} is not approved with passed gates "
                        f"(approval={mv.tags.get('approval')}, gates={mv.tags.get('gates')})")
    require_files(c, name, version)
    champion = alias_version(c, name, CHAMPION)
    model_uri = f"models:/{name}/{version}"
    log.info("rolling out %s with target %s (current champion: %s)", model_uri, cfg.rollout_target, champion)
    from ops import rollout as rollout_api

    rollout = rollout_api.deploy(model_uri, version, target=cfg.rollout_target, **rollout_options(cfg))
    # Only now, with the rollout done, the registry says so.
    if champion and champion != version:
        c.set_registered_model_alias(name, PREVIOUS, champion)
        c.set_model_version_tag(name, version, "previous_champion_version", champion)
    c.set_registered_model_alias(name, CHAMPION, version)
    if alias_version(c, name, CHALLENGER) == version:
        c.delete_registered_model_alias(name, CHALLENGER)
    c.set_model_version_tag(name, version, "deployed_at", now_iso())
    c.set_model_version_tag(name, version, "helm_revision", str(rollout.get("revision", "")))
    log.info("%s version %s is champion (previous champion: %s)", name, version, champion)
    return {"promoted": version, "previous_champion": champion, "rollout": rollout}


def promote_newest_approved(cfg, mlflow_client=None) -> dict:
    """The promote DAG's step: expire stale candidates, then promote the newest approved version."""
    from tasks.approval import approved_not_deployed, expire_stale

    c = mlflow_client or client(cfg)
    expiry = expire_stale(cfg, c)
    candidates = approved_not_deployed(cfg, c)
    if not candidates:
        return {"promoted": None, "reason": "no approved version waiting", **expiry}
    newest = candidates[0]["version"]
    skipped = [cand["version"] for cand in candidates[1:]]
    if skipped:
        log.info("older approved versions %s are superseded by %s", skipped, newest)
    return {**promote(cfg, newest, c), "superseded": skipped, **expiry}
