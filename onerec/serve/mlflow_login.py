"""The serving process's MLflow login: a read-only account, through MLflow's public plugin hook.

pyproject.toml registers `ServingAccountHeaders` under the entry point group
`mlflow.request_header_provider`. It adds the Authorization header only once
`use_serving_account` has set one for this process, so no other process is affected. Where the
account comes from, first found wins:

- MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD in the environment (Kubernetes: the chart's
  env Secret, `envSecret`; the local rollout passes its account this way): MLflow uses them
  itself and nothing is done here;
- the 0600 file Settings.mlflow_serving_credentials_file (default
  <state_dir>/secrets/mlflow-serving.json, which `onerec-fp8 stack up` writes for its read-only
  `onerec-serving` account), so `onerec-fp8 serve --model-uri models:/NAME@champion` works from a
  plain shell on the local stack.
"""

from __future__ import annotations

import base64
import os

from mlflow.tracking.request_header.abstract_request_header_provider import RequestHeaderProvider

SERVING_ACCOUNT: dict = {}  # the Authorization header this process's MLflow requests carry


class ServingAccountHeaders(RequestHeaderProvider):
    def in_context(self) -> bool:
        return bool(SERVING_ACCOUNT)

    def request_headers(self) -> dict:
        return dict(SERVING_ACCOUNT)


def use_serving_account(settings) -> None:
    """Sign this process's MLflow requests in as the serving account (see the module docstring)."""
    if os.environ.get("MLFLOW_TRACKING_USERNAME"):
        return
    creds = settings.mlflow_serving_credentials()
    if creds is None:
        SERVING_ACCOUNT.clear()  # an MLflow without login
        return
    basic = base64.b64encode(f"{creds['username']}:{creds['password']}".encode()).decode()
    SERVING_ACCOUNT["Authorization"] = f"Basic {basic}"
