"""Rollback (on-call, from the Airflow rollback DAG's form): restore previous-champion or a version.

The restored version is redeployed with the rollout target first; only when that succeeded do
the aliases move back:
    champion          -> the restored version
    previous-champion -> what was champion before the restored one (its previous_champion_version
                         tag), or removed when unknown
and the version rolled back FROM gets rolled_back_at, rollback_reason, rolled_back_by (it keeps
deployed_at) and its state record becomes rolled_back, a terminal state: it is never promoted or
restored again. Only a version whose record is `deployed` (it was champion once and was not
rolled back) and whose provenance verifies can be restored. A failed rollout changes nothing.
Rollback and promote take turns (tasks.promote.serving_change).
"""

from __future__ import annotations

import contextlib
import logging

from onerec.errors import UserError
from ops import rollout as rollout_api
from tasks.approval import read_record, transition
from tasks.errors import StateError, StepFailed
from tasks.model_artifacts import model_version, require_files
from tasks.promote import alias_version, require_champion_unchanged, serving_change
from tasks.provenance import verify_version
from tasks.registry import CHAMPION, PREVIOUS, client, now_iso

log = logging.getLogger(__name__)

MAX_VERSION = 2**31 - 1  # the registry stores versions as 32-bit integers


def rollback(cfg, reason: str, version: str | None = None, by: str = "unknown", mlflow_client=None) -> dict:
    if not reason or not reason.strip():
        raise UserError("a rollback needs a reason (it is recorded on the version)")
    if version is not None and not (str(version).strip().isdigit() and 1 <= int(version) <= MAX_VERSION):
        raise StepFailed(f"version must be a registry version number (digits only, 1..{MAX_VERSION}), "
                         f"not {str(version)[:40]!r}")
    version = str(version).strip() if version is not None else None
    c = mlflow_client or client(cfg)
    name = cfg.model_name
    with serving_change(cfg):
        current = alias_version(c, name, CHAMPION)
        target = str(version) if version else alias_version(c, name, PREVIOUS)
        if target is None:
            raise UserError(f"{name} has no {PREVIOUS} alias: give the version to restore explicitly")
        if target == current:
            raise UserError(f"version {target} is already the champion")
        mv = model_version(c, name, target)  # a version that does not exist is a one-line error
        require_files(c, name, target)  # its files are all in the artifact store, before anything moves
        record = read_record(cfg, target, mlflow_client=c)
        if record is None or record["state"] != "deployed":
            state = record["state"] if record else "not registered by the pipeline"
            raise StateError(f"version {target} is {state}: only a version that was deployed and not rolled back "
                             "can be restored")
        digest = verify_version(cfg, c, mv)["evidence"]["version_sha256"]  # the same evidence promote checks
        model_uri = f"models:/{name}/{target}"
        log.info("rolling back %s from version %s to %s (reason: %s, by %s)", name, current, target, reason, by)
        if version:  # an explicit version: deploy exactly that one
            rollout = rollout_api.deploy(cfg, model_uri, target, digest=digest)
        else:  # previous-champion: the target's own rollback (helm rollback / local restart of that version)
            rollout = rollout_api.rollback(cfg, model_uri, target, digest=digest)
        require_champion_unchanged(c, name, current)
        c.set_registered_model_alias(name, CHAMPION, target)
        before = mv.tags.get("previous_champion_version")
        if before and before not in (target, current):
            c.set_registered_model_alias(name, PREVIOUS, before)
        elif alias_version(c, name, PREVIOUS) is not None:
            c.delete_registered_model_alias(name, PREVIOUS)
        c.set_model_version_tag(name, target, "helm_revision", str(rollout.get("revision", "")))
        if current:
            with contextlib.suppress(StateError):  # a champion from before the state records: tags only
                transition(cfg, c, current, "rolled_back", by=by, note=reason.strip())
            for key, value in (("rolled_back_at", now_iso()), ("rollback_reason", reason.strip()[:500]),
                               ("rolled_back_by", by)):
                c.set_model_version_tag(name, current, key, value)
        return {"champion": target, "rolled_back_from": current, "reason": reason, "by": by, "rollout": rollout}
