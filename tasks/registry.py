"""MLflow client helpers of the pipeline (conventions in mlflow_config/registry.md): the signed-in
client of a config's tracking server, version search by tags, the registry's names (experiment,
aliases) and the status of a version's registering run. The registration step itself is
tasks/register.py.
"""

from __future__ import annotations

import base64
import datetime as dt
import logging
import os
import time
from pathlib import Path

from onerec.errors import UserError
from tasks.outages import configure_mlflow_http

log = logging.getLogger(__name__)

EXPERIMENT = "onerec-fp8-pipeline"
CHALLENGER, CHAMPION, PREVIOUS = "challenger", "champion", "previous-champion"
PYFUNC_CODE = Path(__file__).resolve().parent / "pyfunc_model.py"


def use_service_account(cfg) -> None:
    """Sign this process's MLflow requests in as the pipeline's service account.

    MLflow's client takes credentials from MLFLOW_TRACKING_USERNAME/PASSWORD (set in Kubernetes
    from a Secret: then nothing is done here). Otherwise the account comes from its 0600 file
    (Settings.mlflow_credentials) through a request-header provider (tasks/mlflow_headers.py, an
    MLflow plugin), so os.environ stays untouched and child processes get the account explicitly
    (Settings.subprocess_env).
    """
    from tasks.mlflow_headers import SERVICE_ACCOUNT  # heavy: MLflow

    if os.environ.get("MLFLOW_TRACKING_USERNAME"):
        return
    creds = cfg.mlflow_credentials()
    if creds is None:
        SERVICE_ACCOUNT.clear()  # an MLflow without authentication (or credentials from elsewhere)
        return
    basic = base64.b64encode(f"{creds['username']}:{creds['password']}".encode()).decode()
    SERVICE_ACCOUNT["Authorization"] = f"Basic {basic}"


def use_tracking_server(cfg) -> str:
    """Point MLflow at the configured tracking server (with tasks.outages' retry budget).

    Without one, MLflow would quietly create a local ./mlflow.db and find no versions in it.
    """
    import mlflow  # heavy: MLflow

    use_service_account(cfg)
    uri = cfg.tracking_uri()
    if not uri:
        raise UserError("no MLflow tracking server configured: set MLFLOW_TRACKING_URI, or start the local "
                        f"stack (`onerec-fp8 stack up`; state dir {cfg.state_dir})")
    configure_mlflow_http()
    mlflow.set_tracking_uri(uri)
    return uri


def client(cfg):
    """An MlflowClient on the configured tracking server, also as the registry (named, so that a
    registry URI set in this process for another server is never used)."""
    from mlflow import MlflowClient  # heavy: MLflow

    uri = use_tracking_server(cfg)
    return MlflowClient(uri, registry_uri=uri)


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def filter_value(value: str) -> str:
    """`value` quoted for an MLflow search filter (a value with a quote in it is refused)."""
    if "'" in value:
        raise UserError(f"refusing a registry filter value with a quote: {value!r}")
    return f"'{value}'"


def find_versions(cfg, mlflow_client=None, **tags: str) -> list:
    """Versions of the registered model whose tags equal `tags`, newest first."""
    c = mlflow_client or client(cfg)
    filt = " and ".join([f"name={filter_value(cfg.model_name)}"] + [f"tags.{k}={filter_value(v)}" for k, v in tags.items()])
    versions = list(c.search_model_versions(filt))
    return sorted(versions, key=lambda v: int(v.version), reverse=True)


# A registering run still RUNNING after this long was killed (kill -9 leaves MLflow's status as it
# was): longer than the GPU steps' 3 h execution timeout plus the registration itself.
REGISTRATION_STALE_AFTER_S = 6 * 3600


def registering_run_status(c, mv) -> str:
    """`registering` while the run that created version `mv` may still be registering it (RUNNING for
    less than REGISTRATION_STALE_AFTER_S), else that run's status (`gone` when it was deleted)."""
    from mlflow.exceptions import MlflowException  # heavy: MLflow

    try:
        run = c.get_run(mv.run_id) if mv.run_id else None
    except MlflowException:
        run = None  # the run was deleted
    if run is None:
        return "gone"
    if run.info.status == "RUNNING" and time.time() - run.info.start_time / 1000 < REGISTRATION_STALE_AFTER_S:
        return "registering"
    return run.info.status
