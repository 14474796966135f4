"""Before a rollout: the registry's version exists and its files are all in the artifact store.

The registry (MLflow's database) and the artifact store (S3) can disagree: a bucket restored from
an older backup, objects deleted by hand, a local store wiped with `make clean-stack` under a
kept database. Promote and rollback check first, so a version whose files are gone fails at once
with its number and the missing file, before anything is deployed or any alias moves, and the
DAG does not retry it (StepFailed: the files will not come back by waiting).
"""

from __future__ import annotations

import json
import posixpath
import tempfile
from pathlib import Path

from tasks.errors import StepFailed


def model_version(c, name: str, version: str):
    """The registry's model version, or StepFailed (a one-line UserError, not retried: the version
    will not appear by waiting) when there is no such version."""
    from mlflow.exceptions import MlflowException  # heavy: MLflow

    try:
        return c.get_model_version(name, str(version))
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise StepFailed(f"{name} has no version {version}") from None
        raise


def _files(repo, path: str | None = None) -> dict[str, int]:
    out: dict[str, int] = {}
    for info in repo.list_artifacts(path):
        if info.is_dir:
            out.update(_files(repo, info.path))
        else:
            out[info.path] = info.file_size or 0
    return out


def missing_files(c, name: str, version: str) -> tuple[str, list[str]]:
    """(artifact URI, the files of the version that the artifact store lacks or holds truncated)."""
    import yaml  # optional: PyYAML
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository  # heavy: MLflow

    uri = c.get_model_version_download_uri(name, str(version))
    repo = get_artifact_repository(uri)
    files = _files(repo)
    if "MLmodel" not in files:
        return uri, ["MLmodel"]
    with tempfile.TemporaryDirectory() as tmp:
        mlmodel = yaml.safe_load(Path(repo.download_artifacts("MLmodel", tmp)).read_text())
        artifacts = mlmodel.get("flavors", {}).get("python_function", {}).get("artifacts", {})
        folder = artifacts.get("quantized", {}).get("path")
        if folder is None:
            return uri, []  # not one of this pipeline's models: nothing more to check
        manifest_path = posixpath.join(folder, "manifest.json")
        if manifest_path not in files:
            return uri, [manifest_path]
        manifest = json.loads(Path(repo.download_artifacts(manifest_path, tmp)).read_text())
    missing = []
    for entry_name, entry in sorted(manifest.items()):
        path = posixpath.join(folder, entry_name)
        if path not in files or files[path] != entry["bytes"]:
            missing.append(path)
    return uri, missing


def require_files(c, name: str, version: str) -> None:
    """StepFailed naming the version and the missing file(s) when the artifact store lost any."""
    uri, missing = missing_files(c, name, version)
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise StepFailed(f"{name} version {version}: {shown} missing from the artifact store ({uri}); nothing "
                         "was deployed and no alias moved. Delete the version and run the pipeline again "
                         "(docs/runbook.md, 'Storage lost')")
