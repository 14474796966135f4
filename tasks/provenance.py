"""Provenance of a registered version: evidence the pipeline signs at registration, promote re-checks.

The evidence binds one model version to what the pipeline gated:

    model, version, run_id        which registry entry and which pipeline run registered it
    version_sha256                every file of the version as MLflow serves it: MLmodel, the pyfunc
                                  code, the environment files, the quantized folder
                                  (onerec.serve.registry.version_digest)
    model_manifest_sha256         the quantized folder's manifest digest (onerec.manifest)
    checkpoint_sha256, recipe     what was quantized, and how
    gates_report_sha256           the run's reports/gates.json, byte for byte

and its HMAC-SHA256 under the pipeline's provenance key is the version tag `provenance`. The key
is a 0600 file (a mounted Secret in Kubernetes) that MLflow never sees, so an account that can
write registry tags (the UI, the REST API) can neither produce the tag for a version of its own
nor move a valid one to another version, checkpoint, recipe or gate report. Promote downloads
the model afresh (never from a cache) and the run's gate report, recomputes everything and
refuses on any difference; then it hands the verified version_sha256 to the rollout, and the
server loads only bytes that hash to it (what it downloads itself, minutes later, included).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import tempfile
from pathlib import Path

from onerec.errors import UserError
from onerec.manifest import manifest_digest, sha256_file, verify_manifest
from onerec.serve.registry import fetch_version, model_folder, version_digest
from ops.mlflow_auth import read_private, secret_token
from tasks.errors import ProvenanceError
from tasks.gates import Gates
from tasks.registry import PYFUNC_CODE

log = logging.getLogger(__name__)

PROVENANCE_TAG = "provenance"
SCHEME = "hmac-sha256-v1"
GATES_REPORT = "reports/gates.json"


def key_file(cfg) -> Path:
    return Path(cfg.provenance_key_file or Path(cfg.state_dir) / "secrets" / "provenance.key")


def load_key(cfg, create: bool = False) -> bytes:
    """The pipeline's signing key. Registration creates it when missing (a fresh local state dir);
    promote never does: without the key nothing verifies, so nothing is promoted."""
    path = key_file(cfg)
    if not path.is_file():
        if not create:
            raise ProvenanceError(f"no provenance key at {path}: nothing can be verified "
                                  "(set provenance_key_file / ONEREC_PROVENANCE_KEY_FILE)")
        log.warning("no provenance key at %s: generating one (versions signed with another key will not verify)",
                    path)
        secret_token(path)

    try:
        return read_private(path, "provenance key", 32).encode()
    except ValueError as exc:
        raise ProvenanceError(str(exc)) from None


def _mac(key: bytes, purpose: str, record: dict) -> str:
    payload = purpose.encode() + b"\n" + json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(key, payload, hashlib.sha256).hexdigest()


def sign(key: bytes, purpose: str, record: dict) -> str:
    return f"{SCHEME}:{_mac(key, purpose, record)}"


def verifies(key: bytes, purpose: str, record: dict, signature: str | None) -> bool:
    return bool(signature) and hmac.compare_digest(sign(key, purpose, record), str(signature))


def evidence(*, model: str, version: str, run_id: str, version_sha256: str, model_manifest_sha256: str,
             checkpoint_sha256: str, recipe: str, gates_report_sha256: str) -> dict:
    return {"model": model, "version": str(version), "run_id": run_id, "version_sha256": version_sha256,
            "model_manifest_sha256": model_manifest_sha256, "checkpoint_sha256": checkpoint_sha256,
            "recipe": recipe, "gates_report_sha256": gates_report_sha256}


def fetch_digests(cfg, version: str) -> dict:
    """Download `version` afresh (no cache) and hash it: {version_sha256, model_manifest_sha256,
    pyfunc_code_sha256} (the last: of the model's copy of tasks/pyfunc_model.py, "" when it has none)."""
    Path(cfg.work_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="onerec-verify-", dir=cfg.work_dir) as tmp:
        model_dir = fetch_version(f"models:/{cfg.model_name}/{version}", Path(tmp) / "model", cfg.tracking_uri())
        try:
            folder = model_folder(model_dir)
            verify_manifest(folder)
        except UserError as exc:  # an altered folder or MLmodel: not what the pipeline signed
            raise ProvenanceError(f"{cfg.model_name} version {version}: {exc}") from None
        code = sorted(model_dir.rglob(PYFUNC_CODE.name))
        return {"version_sha256": version_digest(model_dir), "model_manifest_sha256": manifest_digest(folder),
                "pyfunc_code_sha256": sha256_file(code[0]) if len(code) == 1 else ""}


def write_gates_report(gates: Gates, report_dir: str | Path) -> tuple[Path, str]:
    """reports/gates.json as the run will keep it, and the sha256 of exactly those bytes."""
    path = Path(report_dir) / "gates.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = gates.to_json()
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def sign_version(cfg, c, version: str, run_id: str, quantized_dir: str | Path, gates_report_sha256: str) -> dict:
    """At registration: the evidence of `version`, its signature as the version tag `provenance`.

    The version digest is taken from a fresh download of what MLflow stored; its quantized folder
    must be the one gated here (manifest digest) and its pyfunc code this package's, byte for byte.
    """
    digests = fetch_digests(cfg, version)
    if digests["model_manifest_sha256"] != manifest_digest(quantized_dir):
        raise ProvenanceError(f"{cfg.model_name} version {version}: the artifact store holds another quantized folder "
                              "than the one this run gated; not signed")
    if digests.pop("pyfunc_code_sha256") != sha256_file(PYFUNC_CODE):
        raise ProvenanceError(f"{cfg.model_name} version {version}: the artifact store holds other pyfunc code than "
                              f"{PYFUNC_CODE.name} of this package; not signed")
    record = evidence(model=cfg.model_name, version=version, run_id=run_id, **digests,
                      checkpoint_sha256=c.get_model_version(cfg.model_name, version).tags["checkpoint_sha256"],
                      recipe=cfg.recipe, gates_report_sha256=gates_report_sha256)
    for key in ("version_sha256", "model_manifest_sha256"):  # mirrors for people; never read back
        c.set_model_version_tag(cfg.model_name, version, key, record[key])
    c.set_model_version_tag(cfg.model_name, version, "gates_report_sha256", gates_report_sha256)
    c.set_model_version_tag(cfg.model_name, version, PROVENANCE_TAG, sign(load_key(cfg, create=True), "version", record))
    return record


def verify_version(cfg, c, mv) -> dict:
    """At promote and rollback: recompute the evidence from the registry's artifacts, downloaded afresh;
    ProvenanceError if it does not verify or the gate report (re-read, under the current policy) did not pass.

    Returns {"evidence": ..., "gates": Gates}.
    """
    name, version = cfg.model_name, str(mv.version)
    signature = mv.tags.get(PROVENANCE_TAG)
    if not signature:
        raise ProvenanceError(f"{name} version {version} carries no pipeline provenance: it was not registered "
                              "by the pipeline")
    if not mv.run_id:
        raise ProvenanceError(f"{name} version {version} names no registering run")
    import mlflow  # heavy: MLflow

    with tempfile.TemporaryDirectory(prefix="onerec-gates-") as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path=GATES_REPORT, dst_path=tmp)
        except Exception as exc:  # MlflowException, or the artifact store's own error
            raise ProvenanceError(f"{name} version {version}: the run's {GATES_REPORT} cannot be read ({exc})") from None
        data = Path(local).read_bytes()
    try:
        gates = Gates.from_json(data)
    except UserError as exc:
        raise ProvenanceError(f"{name} version {version}: {GATES_REPORT}: {exc}") from None
    digests = fetch_digests(cfg, version)
    digests.pop("pyfunc_code_sha256")  # covered by version_sha256
    record = evidence(model=name, version=version, run_id=mv.run_id, **digests,
                      checkpoint_sha256=mv.tags.get("checkpoint_sha256", ""), recipe=mv.tags.get("recipe", ""),
                      gates_report_sha256=hashlib.sha256(data).hexdigest())
    if not verifies(load_key(cfg), "version", record, signature):
        raise ProvenanceError(f"{name} version {version}: the provenance does not verify (the model, checkpoint, "
                              "recipe, gate report or registering run differ from what the pipeline signed)")
    if not gates.passed(cfg.latency_gate_blocking):
        raise ProvenanceError(f"{name} version {version}: its gate report did not pass "
                              f"(latency_gate_blocking={cfg.latency_gate_blocking})")
    return {"evidence": record, "gates": gates}
