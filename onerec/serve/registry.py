"""Registry versions as local folders: `models:/NAME@ALIAS` or `models:/NAME/VERSION` -> a verified folder.

Uses MLflow's client (mlflow-skinny is enough: the `[serve]` extra), with the tracking URI
passed in (onerec.settings.Settings.mlflow_tracking_uri); serving and the pipeline's registry
both fetch through here.

A version is identified by its *version digest*: the sha256 of the sorted list of (path, sha256)
of every file MLflow downloads for it (MLmodel, the pyfunc code, the environment files and every
file of the quantized folder). The pipeline signs it at registration (tasks.provenance) and hands
it to what serves; `download_verified` loads nothing whose bytes hash otherwise. Its cache is
keyed by that digest and hashed again on every use.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from onerec.errors import UserError
from onerec.manifest import check_no_symlinks, sha256_file

DIGEST_LENGTH = 64


def model_folder(model_dir: Path) -> Path:
    """The "quantized" artifact folder inside a downloaded pyfunc model (its path is in MLmodel)."""
    import yaml  # heavy: PyYAML

    try:
        path = yaml.safe_load((model_dir / "MLmodel").read_text())["flavors"]["python_function"]["artifacts"][
            "quantized"]["path"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        raise UserError(f"{model_dir}: no readable MLmodel naming a 'quantized' artifact") from None
    folder = (model_dir / str(path)).resolve()
    if not folder.is_relative_to(model_dir.resolve()):
        raise UserError(f"{model_dir}: the 'quantized' artifact points outside the model; refusing it")
    return folder


def version_digest(model_dir: str | Path) -> str:
    """sha256 over every file of a downloaded version: {relative path: sha256} as canonical JSON."""
    model_dir = Path(model_dir)
    check_no_symlinks(model_dir)
    files = {p.relative_to(model_dir).as_posix(): sha256_file(p) for p in sorted(model_dir.rglob("*")) if p.is_file()}
    return hashlib.sha256(json.dumps(files, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def resolve_version(model_uri: str, tracking_uri: str | None = None) -> str:
    """models:/NAME@ALIAS -> models:/NAME/VERSION (an alias moves; a version does not)."""
    if "@" not in model_uri:
        return model_uri
    from mlflow import MlflowClient  # heavy: MLflow

    name, alias = model_uri[len("models:/"):].split("@", 1)
    registry = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    return f"models:/{name}/{registry.get_model_version_by_alias(name, alias).version}"


def fetch_version(model_uri: str, dst_dir: str | Path, tracking_uri: str | None = None) -> Path:
    """Download every file of `models:/NAME/VERSION` (or @ALIAS) afresh into the new folder dst_dir."""
    import mlflow  # heavy: MLflow

    if not model_uri.startswith("models:/"):
        raise UserError(f"{model_uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    dst_dir = Path(dst_dir)
    if dst_dir.exists() and any(dst_dir.iterdir()):
        raise UserError(f"{dst_dir}: a fresh download needs an empty folder")
    dst_dir.mkdir(parents=True, exist_ok=True)
    mlflow.artifacts.download_artifacts(artifact_uri=resolve_version(model_uri, tracking_uri), dst_path=str(dst_dir),
                                       tracking_uri=tracking_uri, registry_uri=tracking_uri)
    return dst_dir


def download_verified(model_uri: str, cache_dir: str | Path, digest: str, tracking_uri: str | None = None) -> Path:
    """The quantized folder of `model_uri`, whose files must hash to the signed version digest `digest`.

    A copy in cache_dir/<digest> is used when it still hashes to it (else it is removed); otherwise
    the version is downloaded into a temporary folder, hashed, and renamed into the cache only when
    it matches. Anything else is a one-line UserError, and nothing is loaded. (The caller verifies
the quantized folder's own manifest before loading it, as for any folder.)
    """
    digest = digest.strip().lower()
    if len(digest) != DIGEST_LENGTH or any(ch not in "0123456789abcdef" for ch in digest):
        raise UserError(f"model digest {digest!r}: expected the 64 hex digits of a signed version digest")
    cache_dir = Path(cache_dir)
    cached = cache_dir / digest
    if cached.is_dir():
        if version_digest(cached) == digest:
            return model_folder(cached)
        shutil.rmtree(cached)  # altered in the cache: download again
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{digest[:12]}.", dir=cache_dir))
    try:
        fetch_version(model_uri, tmp, tracking_uri)
        got = version_digest(tmp)
        if got != digest:
            raise UserError(f"{model_uri}: the downloaded files (version digest {got[:16]}...) are not the signed ones "
                            f"({digest[:16]}...): the artifact store was altered; refusing to load")
        try:
            os.replace(tmp, cached)
        except OSError:  # another server renamed its download there first: hash that one too
            if version_digest(cached) != digest:
                raise UserError(f"{cached}: does not hash to the signed version digest; refusing to load") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model_folder(cached)
