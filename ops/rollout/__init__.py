"""Roll a model version out to serving, and back: the pipeline's promote and rollback steps call this.

    deploy(settings, model_uri, version, digest=None, **options) -> dict   ("revision", "url", ...)
    rollback(settings, model_uri=None, version=None, digest=None, **options) -> dict
    status(settings, **options) -> dict

`settings` is the caller's configuration (onerec.settings.Settings, e.g. the promote's
PipelineConfig); nothing here reads the environment. Its rollout_target picks the target: `helm`
(production, ops/rollout/helm.py: release, namespace, values, kube context, tracking URI) or
`local` (the embedded default, ops/rollout/local.py: state dir, serving port, the serving
child's environment). Either way a failed rollout raises RolloutError and leaves the previous
version serving; the caller then leaves the registry aliases unchanged. Registry URIs with an
alias are pinned to `models:/NAME/VERSION` before deploying, so a later alias move cannot
change what runs. A registry version ships with its signed version digest (`digest`, from the
verified provenance): the server it starts loads nothing that hashes otherwise.
"""

from __future__ import annotations

from onerec.settings import Settings
from ops.rollout import local
from ops.rollout.base import RolloutError, pinned_uri

__all__ = ["RolloutError", "deploy", "pinned_uri", "rollback", "status"]


def deploy(settings: Settings, model_uri: str, version: str | int, digest: str | None = None, **options) -> dict:
    """Serve `model_uri` (label `version`, signed version digest `digest`) on settings.rollout_target;
    returns at least target, revision, url, version."""
    uri = pinned_uri(model_uri, version)
    if settings.rollout_target == "helm":
        from ops.rollout import helm  # optional: the Helm SDK ([pipeline] extra)

        return helm.deploy(settings, uri, str(version), digest=digest, **options)
    return local.deploy(settings, uri, str(version), digest=digest, **options)


def rollback(settings: Settings, model_uri: str | None = None, version: str | int | None = None,
             digest: str | None = None, **options) -> dict:
    """Back to the previous version (or to `model_uri`/`version` when given: the local target restarts it)."""
    if settings.rollout_target == "helm":
        from ops.rollout import helm

        return helm.rollback(settings, **options)
    return local.rollback(settings, model_uri, None if version is None else str(version), digest=digest, **options)


def status(settings: Settings, **options) -> dict:
    if settings.rollout_target == "helm":
        from ops.rollout import helm

        return helm.status(settings, **options)
    return local.status(settings.state_dir)
