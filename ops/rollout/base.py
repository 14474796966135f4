"""What both rollout targets share: their error and the pinning of a registry URI to its version."""

from __future__ import annotations

from onerec.errors import UserError


class RolloutError(UserError):
    """A rollout or rollback did not complete; what served before still serves."""


def pinned_uri(model_uri: str, version: str | int | None) -> str:
    """`models:/NAME/VERSION` for an alias URI, so that a later alias move cannot change what runs."""
    from onerec.serve.model_store import (  # heavy: numpy, FastAPI
        parse_model_uri,  # heavy: numpy; `stack` imports the rollout without it
    )

    return parse_model_uri(model_uri).pinned_uri(None if version is None else str(version))
