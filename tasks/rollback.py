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


MIN_REASON_CHARS = 3


def rollback_request(reason, version=None) -> tuple[str, str | None]:
    """The rollback form's two fields checked: (reason, version or None for previous-champion).

    Bad input is a StepFailed with one line an operator reads in the task's log and the failure
    mail (the Airflow form itself would answer a schema violation with raw JSON-schema text).
    """
    if not isinstance(reason, str) or len(reason.strip()) < MIN_REASON_CHARS:
        raise StepFailed(f"reason: say why you roll back, at least {MIN_REASON_CHARS} characters (the incident "
                         "link or the symptom); it is recorded on the version rolled back from")
    if version is None or (isinstance(version, str) and not version.strip()):
        return reason.strip(), None
    text = str(version).strip()
    if isinstance(version, bool) or not (len(text) <= 10 and text.isascii() and text.isdigit()
                                         and 1 <= int(text) <= MAX_VERSION):
        raise StepFailed(f"version: a registry version number such as 12 (digits only, 1..{MAX_VERSION}), or "
                         f"empty to restore the previous champion; got {str(version)[:40]!r}")
    return reason.strip(), str(int(text))


def rollback(cfg, reason: str, version: str | None = None, by: str = "unknown", mlflow_client=None) -> dict:
    reason, version = rollback_request(reason, version)
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
