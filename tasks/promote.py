"""Promote: roll out an approved version, then move the aliases (only after the rollout succeeded).

Before anything moves, the version must be `approved` in its state record (tasks.approval) and its
provenance must verify against the model, downloaded afresh, and the run's gate report
(tasks.provenance); the rollout gets the verified version digest, and its server loads nothing
that hashes otherwise;
the scheduled path also refuses a version older than the champion. A refusal is a tag on the
version (promotion_refused) and an error; nothing is deployed and no alias moves.

    champion          -> the promoted version
    previous-champion -> the version that was champion before (what rollback restores)
    challenger        -> removed when it pointed at the promoted version
    version tags      deployed_at, helm_revision, previous_champion_version

A failed rollout raises and leaves every alias and tag as it was. With canary steps configured
(PipelineConfig.canary) and a champion serving, the version first walks the canary beside it
(tasks/canary.py); a failed step rolls back to the champion, marks the version rolled_back,
notifies on-call and raises, with no alias moved. With the helm target and the chart's canary
(values canary.enabled) promote waits for the Argo Rollout's verdict the same way.

Promote and rollback change what serves, so they take turns (`serving_change`): a lock per model
on this host, and, for runs on other hosts, the champion read before the rollout must still be the
champion before the aliases move.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path

from ops import rollout as rollout_api
from ops.processes import file_lock
from ops.rollout.helm import canary_enabled
from tasks.approval import REFUSED_TAG, read_record, refuse, review, transition, versions_in_state
from tasks.canary import judge_rollout, walk
from tasks.errors import ProvenanceError, StateError, StepFailed
from tasks.model_artifacts import model_version, require_files
from tasks.provenance import verify_version
from tasks.registry import CHALLENGER, CHAMPION, PREVIOUS, client, now_iso

log = logging.getLogger(__name__)


@contextlib.contextmanager
def serving_change(cfg) -> Iterator[None]:
    """Hold this host's lock on what serves `cfg.model_name` (blocks until the holder is done;
    the kernel releases it when its holder dies)."""
    key = hashlib.sha256(cfg.model_name.encode()).hexdigest()[:24]
    path = Path(cfg.state_dir) / "locks" / f"serving-{key}.lock"
    log.info("waiting for the serving lock %s (one promote or rollback at a time)", path)
    with file_lock(path):
        yield


def require_champion_unchanged(c, name: str, champion: str | None) -> None:
    """The champion read before the rollout is still the champion (a run on another host did not
    promote or roll back meanwhile); otherwise no alias moves and on-call must look."""
    now = alias_version(c, name, CHAMPION)
    if now != champion:
        raise StepFailed(f"{name}: the champion changed from {champion} to {now} while this rollout ran "
                         "(another promote or rollback); the aliases were not moved: check what serves")


def alias_version(c, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException  # heavy: MLflow

    try:
        return c.get_model_version_by_alias(name, alias).version
    except MlflowException:
        return None


def check_promotable(cfg, c, version: str, champion: str | None, scheduled: bool) -> dict:
    """Everything promote requires of `version`, or StateError/ProvenanceError (recorded on the version)."""
    name = cfg.model_name
    try:
        record = read_record(cfg, version, mlflow_client=c)
        if record is None:
            raise StateError(f"{name} version {version} has no pipeline state record: it was not registered by the "
                             "pipeline and is never promoted")
        if record["state"] != "approved":
            raise StateError(f"{name} version {version} is {record['state']}, not approved; only an approved "
                             "version is promoted (terminal states: rejected, expired, rolled_back)")
        if scheduled and champion and int(version) < int(champion):
            raise StateError(f"{name} version {version} is older than the champion {champion}: only a rollback "
                             "deploys an older version")
        verified = verify_version(cfg, c, c.get_model_version(name, version))
    except (StateError, ProvenanceError) as exc:
        refuse(cfg, c, version, str(exc))
        raise
    return {"record": record, **verified}


def promote(cfg, version: str, mlflow_client=None, scheduled: bool = False) -> dict:
    """Deploy `version` with the configured rollout target, then move champion/previous-champion.

    Only an approved version (state record) whose provenance verifies is deployed; the scheduled
    path also refuses a version older than the champion.
    """
    c = mlflow_client or client(cfg)
    name, version = cfg.model_name, str(version)
    with serving_change(cfg):
        model_version(c, name, version)  # a version that does not exist is a one-line error
        require_files(c, name, version)  # its files are all in the artifact store, before anything moves
        champion = alias_version(c, name, CHAMPION)
        checked = check_promotable(cfg, c, version, champion, scheduled)
        approved = checked["record"]["history"][-1]
        model_uri = f"models:/{name}/{version}"
        log.info("rolling out %s with target %s (current champion: %s; approved by %s at %s)", model_uri,
                 cfg.rollout_target, champion, approved.get("by"), approved.get("approved_at") or approved.get("at"))
        digest = checked["evidence"]["version_sha256"]  # the server loads only bytes that hash to it
        if cfg.canary.weights and champion and champion != version and cfg.rollout_target == "local":
            # step by step beside the champion; a failed step rolls back, marks, notifies and raises
            rollout = walk(cfg, c, version, model_uri, digest, champion)
        elif champion and champion != version and cfg.rollout_target == "helm" and canary_enabled(cfg):
            # the chart's Argo Rollout walks the steps; not Healthy in time: helm rollback, marks, notifies, raises
            rollout = judge_rollout(cfg, c, version, model_uri, digest, champion)
        else:
            rollout = rollout_api.deploy(cfg, model_uri, version, digest=digest)  # target, port, release: cfg's
        require_champion_unchanged(c, name, champion)
        # Only now, with the rollout done, the registry says so.
        transition(cfg, c, version, "deployed", by="pipeline", note=f"rollout revision {rollout.get('revision', '')}",
                   previous_champion=champion, approved_by=approved.get("by"),
                   registering_run=checked["record"]["run_id"], version_sha256=digest)
        if champion and champion != version:
            c.set_registered_model_alias(name, PREVIOUS, champion)
            c.set_model_version_tag(name, version, "previous_champion_version", champion)
        c.set_registered_model_alias(name, CHAMPION, version)
        if alias_version(c, name, CHALLENGER) == version:
            c.delete_registered_model_alias(name, CHALLENGER)
        c.set_model_version_tag(name, version, "deployed_at", now_iso())
        c.set_model_version_tag(name, version, "helm_revision", str(rollout.get("revision", "")))
        log.info("%s version %s is champion (previous champion: %s)", name, version, champion)
        return {"promoted": version, "previous_champion": champion, "approved_by": approved.get("by"),
                "approved_at": approved.get("approved_at") or approved.get("at"),
                "registering_run": checked["record"]["run_id"], "evidence": checked["evidence"], "rollout": rollout}


def promote_newest_approved(cfg, mlflow_client=None, reviewed_before: dict | None = None) -> dict:
    """The promote DAG's step: apply decisions and expiry, then promote the newest approved version.

    Raises StepFailed (after promoting what it could) when a version was refused in this pass or
    in `reviewed_before` (the result of the review the DAG's first task ran: a refusal it recorded
    is not refused again here), so that on-call hears of a forged, copied, tampered or dead
    version someone tried to push through.
    """
    c = mlflow_client or client(cfg)
    reviewed = review(cfg, c)
    refused = sorted({*(reviewed_before or {}).get("refused", ()), *reviewed["refused"]}, key=int)
    approved = versions_in_state(cfg, "approved", c)
    # a refused version waits until a person deletes its promotion_refused tag (it is verified again then)
    held = [v for v in approved if REFUSED_TAG in c.get_model_version(cfg.model_name, v).tags]
    candidates = [v for v in approved if v not in held]
    result: dict = {"promoted": None, "reason": "no approved version waiting", "held": held, **reviewed}
    if candidates:
        newest, superseded = candidates[0], candidates[1:]
        if superseded:
            log.info("older approved versions %s are superseded by %s", superseded, newest)
        try:
            result = {**promote(cfg, newest, c, scheduled=True), "superseded": superseded, "held": held, **reviewed}
        except (StateError, ProvenanceError) as exc:
            refused.append(newest)
            result["reason"] = str(exc)
    if refused:
        raise StepFailed(f"{cfg.model_name}: refused version(s) {refused} (see the tag promotion_refused on each); "
                         f"promoted: {result['promoted']}")
    return result
