"""Approval: the state machine of a registered version and the decision an approver makes in the MLflow UI.

    pending -> approved -> deployed -> rolled_back
    pending -> rejected | expired
    approved -> rolled_back      (its canary failed: tasks/canary.py)

rejected, expired and rolled_back are terminal: such a version is never promoted again. A
superseded champion stays `deployed`, which is what rollback may restore.

Where the state lives. Not in registry tags (any account with EDIT on the model rewrites those)
but in the pipeline's own store: one record per version, s3://BUCKET/PREFIX/registry/<model>/<version>.json,
with the whole history (state, when, by whom, why), signed with the provenance key
(tasks.provenance). An account that can edit the registry cannot move a version out of a terminal
state, cannot make a forged version a candidate (it has no record), and cannot replay a record
of another version (the signature covers the model and version). The version tag `state` mirrors
the record for the UI and is never read back.

Freshness. Each record carries a `sequence` (1 at registration, +1 per transition) under its
signature, and each write sets the version tag `state_sequence` to it. The MLflow server lets that
tag only grow (ops.mlflow_auth), so an S3 writer who puts back an older, validly signed record
(say, the `deployed` one saved before a rollback) is caught: a record whose sequence is below the
tag is refused as a replay.

The decision. An approver sets the version tag `approval` in the MLflow UI; the MLflow server
lets only approver accounts set it and records who did in `approval_by` (ops.mlflow_auth).
`review` reads the tag case- and whitespace-tolerantly (`Approved ` is approved); any other value
is flagged on the version (`approval_problem`, naming the problem), and nothing happens until it
is fixed. An approval also needs `approval_by` to be one of the configured approvers.
Pending versions older than approval_max_age_hours expire and lose the challenger alias, as do
rejected ones.
"""

from __future__ import annotations

import datetime as dt
import logging
import time

from tasks.checkpoints import read_json, s3_client, write_json
from tasks.errors import StateError
from tasks.provenance import load_key, sign, verifies
from tasks.registry import CHALLENGER, client, find_versions, now_iso, registering_run_status

log = logging.getLogger(__name__)

TRANSITIONS = {"pending": ("approved", "rejected", "expired"), "approved": ("deployed", "rolled_back"),
               "deployed": ("rolled_back",)}
TERMINAL = ("rejected", "expired", "rolled_back")
DECISIONS = ("pending", "approved", "rejected")  # what an approver may write into `approval`
REFUSED_TAG, PROBLEM_TAG, STATE_TAG = "promotion_refused", "approval_problem", "state"
# what `state` and `gates` say on a version the pipeline did not register (a copy made by MLflow's
# "Promote model" button, a version registered by hand): never a candidate, whatever else it carries
NOT_REGISTERED, NOT_A_CANDIDATE = "not-registered-by-pipeline", "not-a-candidate"
NOT_REGISTERED_NOTE = ("**NOT A CANDIDATE: this version was not registered by the pipeline** (it has no pipeline "
                       "state record: a copy made by \"Promote model\", or registered by hand). It is never "
                       "promoted, whatever its tags say.")
SEQUENCE_TAG = "state_sequence"  # ops.mlflow_auth.STATE_SEQUENCE_TAG: the server lets it only grow


# --- the record in the pipeline's store -----------------------------------------------------------------


def record_uri(cfg, version: str) -> str:
    return f"{cfg.s3_root}/registry/{cfg.model_name}/{version}.json"


def _signed(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "signature"}


def read_record(cfg, version: str, s3=None, mlflow_client=None) -> dict | None:
    """The version's verified, freshest record; None when the pipeline never registered it."""
    record = read_json(s3 or s3_client(cfg), record_uri(cfg, str(version)))
    if record is None:
        return None
    if (record.get("model"), record.get("version")) != (cfg.model_name, str(version)) or not verifies(
            load_key(cfg), "state", _signed(record), record.get("signature")):
        raise StateError(f"the state record of {cfg.model_name} version {version} ({record_uri(cfg, version)}) "
                         "does not verify: it was not written by the pipeline")
    newest = _newest_sequence(cfg, mlflow_client or client(cfg), str(version))
    if int(record.get("sequence", 0)) < newest:
        raise StateError(f"the state record of {cfg.model_name} version {version} is sequence "
                         f"{record.get('sequence', 0)} ({record['state']}), older than the last one written "
                         f"({newest}): a replayed record is refused")
    return record


def _newest_sequence(cfg, c, version: str) -> int:
    from mlflow.exceptions import MlflowException  # heavy: MLflow

    try:
        value = c.get_model_version(cfg.model_name, version).tags.get(SEQUENCE_TAG, "0")
    except MlflowException:
        return 0  # the version is gone from the registry: nothing to compare with
    return int(value) if value.isdigit() else 0


def _write(cfg, c, record: dict, s3=None) -> dict:
    record = {**_signed(record), "sequence": int(record.get("sequence", 0)) + 1}
    record["signature"] = sign(load_key(cfg, create=True), "state", record)
    write_json(s3 or s3_client(cfg), record_uri(cfg, record["version"]), record)
    c.set_model_version_tag(cfg.model_name, record["version"], SEQUENCE_TAG, str(record["sequence"]))
    c.set_model_version_tag(cfg.model_name, record["version"], STATE_TAG, record["state"])
    return record


def start(cfg, c, version: str, run_id: str, s3=None) -> dict:
    """At registration: the version's record, state pending."""
    record = {"model": cfg.model_name, "version": str(version), "run_id": run_id, "state": "pending",
              "history": [{"state": "pending", "at": now_iso(), "by": "pipeline", "note": f"registered by run {run_id}"}]}
    return _write(cfg, c, record, s3)


def transition(cfg, c, version: str, to: str, by: str, note: str = "", s3=None, **details) -> dict:
    """Move the version's record to `to`; StateError when the machine does not allow it."""
    record = read_record(cfg, version, s3, c)
    if record is None:
        raise StateError(f"{cfg.model_name} version {version} has no pipeline state record: it was not "
                         "registered by the pipeline")
    if to not in TRANSITIONS.get(record["state"], ()):
        terminal = " (terminal)" if record["state"] in TERMINAL else ""
        raise StateError(f"{cfg.model_name} version {version} is {record['state']}{terminal}; it cannot become {to}")
    entry = {"state": to, "at": now_iso(), "by": by, "note": note[:500], **details}
    return _write(cfg, c, {**record, "state": to, "history": [*record["history"], entry]}, s3)


def refuse(cfg, c, version: str, reason: str) -> str:
    """Record a refusal on the version (visible in the UI) and return the message."""
    message = f"{now_iso()} {reason}"[:5000]
    c.set_model_version_tag(cfg.model_name, str(version), REFUSED_TAG, message)
    log.warning("refused %s version %s: %s", cfg.model_name, version, reason)
    return reason


# --- the approver's decision ------------------------------------------------------------------------------


def normalize_decision(value: str | None) -> str | None:
    """`approval` as written by a person: case and surrounding whitespace ignored; None if not a decision."""
    if value is None:
        return None
    value = value.strip().lower()
    return value if value in DECISIONS else None


def _remove_alias_if_on(c, name: str, alias: str, version: str) -> bool:
    from mlflow.exceptions import MlflowException  # heavy: MLflow

    try:
        current = c.get_model_version_by_alias(name, alias)
    except MlflowException:
        return False
    if current.version == str(version):
        c.delete_registered_model_alias(name, alias)
        return True
    return False


def _ms(iso: str) -> float:
    return dt.datetime.strptime(iso, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC).timestamp() * 1000


def _set_problem(c, name: str, version: str, tags: dict, problem: str | None) -> None:
    if problem and tags.get(PROBLEM_TAG) != problem:
        c.set_model_version_tag(name, version, PROBLEM_TAG, problem)
        log.warning("%s version %s: %s", name, version, problem)
    elif not problem and PROBLEM_TAG in tags:
        c.delete_model_version_tag(name, version, PROBLEM_TAG)


def _mark_not_registered(cfg, c, mv) -> bool:
    """Make a version the pipeline did not register look like what it is (in the versions list and on
    its page); False when it is marked already or may still be being registered by a pipeline run."""
    if mv.tags.get(STATE_TAG) == NOT_REGISTERED or registering_run_status(c, mv) == "registering":
        return False
    name = cfg.model_name
    c.set_model_version_tag(name, mv.version, STATE_TAG, NOT_REGISTERED)
    c.set_model_version_tag(name, mv.version, "gates", NOT_A_CANDIDATE)
    description = c.get_model_version(name, mv.version).description or ""
    if not description.startswith(NOT_REGISTERED_NOTE):
        c.update_model_version(name, mv.version, description=f"{NOT_REGISTERED_NOTE}\n\n{description}".strip())
    _remove_alias_if_on(c, name, CHALLENGER, mv.version)
    log.warning("%s version %s was not registered by the pipeline: marked %s", name, mv.version, NOT_A_CANDIDATE)
    return True


def accept_calibration(cfg, c, record: dict, s3) -> None:
    """An approved version's calibration data becomes the drift check's reference: its profile (stored
    by the validate step under the table's digest) is copied to accepted_profile_uri. The digest is
    read from the registering run's params, which no one can change after the run logged them."""
    digest = c.get_run(record["run_id"]).data.params.get("calibration_sha256")
    profile = read_json(s3, cfg.calibration_profile_uri(digest)) if digest else None
    if profile is None:
        log.warning("version %s: no stored calibration profile for %s; the drift reference stays",
                    record["version"], digest)
        return
    write_json(s3, cfg.accepted_profile_uri, profile)
    log.info("version %s approved: its calibration data %s is the drift reference", record["version"], digest[:12])


def review(cfg, mlflow_client=None, now_s: float | None = None, s3=None) -> dict:
    """Apply the approvers' decisions and expiry to every version's record.

    Returns {approved, rejected, expired, flagged, refused, unaliased, marked} (version lists;
    `marked`: versions the pipeline did not register, now tagged state=not-registered-by-pipeline,
    gates=not-a-candidate, with a warning heading their description and no challenger alias).
    """
    c = mlflow_client or client(cfg)
    s3 = s3 or s3_client(cfg)
    name = cfg.model_name
    now_ms = (now_s if now_s is not None else time.time()) * 1000
    max_age_ms = cfg.approval_max_age_hours * 3600 * 1000
    out = {k: [] for k in ("approved", "rejected", "expired", "flagged", "refused", "unaliased", "marked")}
    for v in reversed(find_versions(cfg, c)):
        raw = v.tags.get("approval")
        decision = normalize_decision(raw)
        try:
            record = read_record(cfg, v.version, s3, c)
        except StateError as exc:
            record, problem = None, str(exc)
        else:
            problem = None
        approval_at = v.tags.get("approval_at", "")
        refused_at = v.tags.get(REFUSED_TAG, "")[:20]
        fresh = decision == "approved" and not (refused_at and refused_at >= approval_at)  # not refused yet
        if record is None:
            # not the pipeline's: never a candidate, whatever its tags say
            if problem is None and _mark_not_registered(cfg, c, v):
                out["marked"].append(v.version)
            if fresh:
                refuse(cfg, c, v.version, problem or "no pipeline state record: this version was not registered by "
                                                     "the pipeline and is never promoted")
                out["refused"].append(v.version)
            continue
        state = record["state"]
        if state != "pending":
            # an approval given after the version died (the approval tag of a version that was once
            # deployed and later rolled back is older than its rollback, and is left alone)
            if state in TERMINAL and fresh and approval_at >= record["history"][-1]["at"]:
                refuse(cfg, c, v.version, f"approval ignored: the version is {state}, a terminal state; "
                                          "it is never promoted again")
                out["refused"].append(v.version)
            continue
        deadline_ms = v.creation_timestamp + max_age_ms
        if now_ms > deadline_ms and not (decision in ("approved", "rejected") and approval_at
                                         and _ms(approval_at) <= deadline_ms):
            transition(cfg, c, v.version, "expired", by="pipeline", s3=s3,
                       note=f"pending for more than {cfg.approval_max_age_hours:g} h")
            c.set_model_version_tag(name, v.version, "expired_at", now_iso())
            out["expired"].append(v.version)
            if _remove_alias_if_on(c, name, CHALLENGER, v.version):
                out["unaliased"].append(v.version)
            if decision == "approved":  # approved too late
                refuse(cfg, c, v.version, "approved after approval_max_age_hours: the version expired")
                out["refused"].append(v.version)
            continue
        if raw is not None and decision is None:
            _set_problem(c, name, v.version, v.tags,
                         f"approval={raw!r} is not a decision: write approved or rejected (case and spaces "
                         "do not matter); nothing happens until then")
            out["flagged"].append(v.version)
        elif decision == "approved":
            by = v.tags.get("approval_by")
            if by not in cfg.approvers:
                _set_problem(c, name, v.version, v.tags,
                             f"approval by {by or 'an unknown account'} does not count: approvers are "
                             f"{', '.join(cfg.approvers)}")
                out["flagged"].append(v.version)
            else:
                _set_problem(c, name, v.version, v.tags, None)
                transition(cfg, c, v.version, "approved", by=by, note=f"approval={raw!r}", s3=s3,
                           approved_at=v.tags.get("approval_at"))
                accept_calibration(cfg, c, record, s3)
                out["approved"].append(v.version)
                continue
        elif decision == "rejected":
            _set_problem(c, name, v.version, v.tags, None)
            transition(cfg, c, v.version, "rejected", by=v.tags.get("approval_by", "unknown"), s3=s3)
            out["rejected"].append(v.version)
            if _remove_alias_if_on(c, name, CHALLENGER, v.version):
                out["unaliased"].append(v.version)
            continue
    for key in ("approved", "rejected", "expired", "flagged", "refused", "marked"):
        if out[key]:
            log.info("%s: %s %s", name, key, out[key])
    return out


def expire_stale(cfg, mlflow_client=None, now_s: float | None = None) -> dict:
    """`onerec-fp8 pipeline expire` and the promote DAG's first step: the whole review (expiry included)."""
    return review(cfg, mlflow_client, now_s)


def versions_in_state(cfg, state: str, mlflow_client=None, s3=None) -> list[str]:
    """Versions whose verified record is in `state`, newest first."""
    c = mlflow_client or client(cfg)
    s3 = s3 or s3_client(cfg)
    out = []
    for v in find_versions(cfg, c):
        try:
            record = read_record(cfg, v.version, s3, c)
        except StateError:
            continue
        if record is not None and record["state"] == state:
            out.append(v.version)
    return out
