"""The pipeline's MLflow login as a request-header provider, through MLflow's public plugin hook.

pyproject.toml registers `ServiceAccountHeaders` under the entry point group
`mlflow.request_header_provider`; MLflow loads it when its tracking client is imported. It adds
the Authorization header only once `tasks.registry.use_service_account` has set one for this
process (in_context), so every other process that imports MLflow (the tracking server included)
is unaffected.
"""

from __future__ import annotations

from mlflow.tracking.request_header.abstract_request_header_provider import RequestHeaderProvider

SERVICE_ACCOUNT: dict = {}  # the Authorization header MLflow requests of this process carry


class ServiceAccountHeaders(RequestHeaderProvider):
    def in_context(self) -> bool:
        return bool(SERVICE_ACCOUNT)

    def request_headers(self) -> dict:
        return dict(SERVICE_ACCOUNT)
