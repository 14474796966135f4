"""Registry versions as local folders: `models:/NAME@ALIAS` or `models:/NAME/VERSION` -> a verified folder.

Uses MLflow's client (mlflow-skinny is enough: the `[serve]` extra), with the tracking URI
passed in (onerec.settings.Settings.mlflow_tracking_uri); serving and the pipeline's registry
both fetch through here.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from onerec.errors import UserError


def _model_folder(model_dir: Path) -> Path:
    """The "quantized" artifact folder inside a downloaded pyfunc model (its path is in MLmodel)."""
    import yaml

    mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text())
    artifacts = mlmodel.get("flavors", {}).get("python_function", {}).get("artifacts", {})
    if "quantized" not in artifacts:
        raise UserError(f"{model_dir}: the model has no 'quantized' artifact")
    return model_dir / artifacts["quantized"]["path"]


def resolve_version(model_uri: str, tracking_uri: str | None = None) -> str:
    """models:/NAME@ALIAS -> models:/NAME/VERSION (an alias moves; a version does not)."""
    if "@" not in model_uri:
        return model_uri
    from mlflow import MlflowClient

    name, alias = model_uri[len("models:/"):].split("@", 1)
    return f"models:/{name}/{MlflowClient(tracking_uri).get_model_version_by_alias(name, alias).version}"


def download_model(model_uri: str, dst_dir: str | Path, tracking_uri: str | None = None) -> Path:
    """The local quantized (or bf16) folder of `models:/NAME@ALIAS` or `models:/NAME/VERSION`.

    Downloads the model into dst_dir (reusing an intact earlier download of the same version) and
    verifies the folder's manifest.
    """
    import mlflow

    from onerec.manifest import verify_manifest

    if not model_uri.startswith("models:/"):
        raise UserError(f"{model_uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    dst_dir = Path(dst_dir)
    dst_dir.mkdir(parents=True, exist_ok=True)
    resolved = resolve_version(model_uri, tracking_uri)
    marker = dst_dir / ".model_uri"
    if (dst_dir / "MLmodel").is_file():
        try:
            folder = _model_folder(dst_dir)
            verify_manifest(folder)
            if marker.is_file() and marker.read_text() == resolved:
                return folder
        except UserError:
            pass
        for child in dst_dir.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    mlflow.artifacts.download_artifacts(artifact_uri=resolved, dst_path=str(dst_dir), tracking_uri=tracking_uri,
                                   registry_uri=tracking_uri)
    marker.write_text(resolved)
    folder = _model_folder(dst_dir)
    verify_manifest(folder)
    return folder
