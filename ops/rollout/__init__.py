"""Roll a model version out to serving, and back: the pipeline's promote and rollback steps call this.

    deploy(model_uri, version, target=None, digest=None, **options) -> dict   ("revision", "url", ...)
    rollback(target=None, model_uri=None, version=None, digest=None, **options) -> dict
    status(target=None, **options) -> dict

The target comes from the argument, else Settings.rollout_target (ONEREC_ROLLOUT_TARGET,
default "local"): `helm` (production, ops/rollout/helm.py) or `local` (the embedded default,
ops/rollout/local.py). Either way a failed rollout raises RolloutError and leaves the previous
version serving; the caller then leaves the registry aliases unchanged. Registry URIs with an
alias are pinned to `models:/NAME/VERSION` before deploying, so a later alias move cannot
change what runs. A registry version ships with its signed version digest (`digest`, from the
verified provenance): the server it starts loads nothing that hashes otherwise.
"""

from __future__ import annotations

from onerec.errors import UserError
from onerec.settings import Settings

TARGETS = ("local", "helm")


class RolloutError(UserError):
    """A rollout or rollback did not complete; what served before still serves."""


def resolve_target(target: str | None = None) -> str:
    target = target or Settings.load().rollout_target
    if target not in TARGETS:
        raise UserError(f"rollout target must be one of {TARGETS}, not {target!r} (ONEREC_ROLLOUT_TARGET)")
    return target


def pinned_uri(model_uri: str, version: str | int | None) -> str:
    from onerec.serve.model_store import parse_model_uri

    return parse_model_uri(model_uri).pinned_uri(None if version is None else str(version))


def deploy(model_uri: str, version: str | int, target: str | None = None, digest: str | None = None,
           **options) -> dict:
    """Serve `model_uri` (label `version`, signed version digest `digest`) on `target`; returns at
    least target, revision, url, version."""
    target = resolve_target(target)
    uri = pinned_uri(model_uri, version)
    if target == "helm":
        from ops.rollout import helm

        return helm.deploy(uri, str(version), digest=digest, **options)
    from ops.rollout import local

    return local.deploy(uri, str(version), digest=digest, **options)


def rollback(target: str | None = None, model_uri: str | None = None, version: str | int | None = None,
             digest: str | None = None, **options) -> dict:
    """Back to the previous version (or to `model_uri`/`version` when given: the local target restarts it)."""
    target = resolve_target(target)
    if target == "helm":
        from ops.rollout import helm

        return helm.rollback(**options)
    from ops.rollout import local

    return local.rollback(model_uri, None if version is None else str(version), digest=digest, **options)


def status(target: str | None = None, **options) -> dict:
    target = resolve_target(target)
    if target == "helm":
        from ops.rollout import helm

        return helm.status(**options)
    from ops.rollout import local

    return local.status(**options)
