"""onerec_fp8_promote: roll out what an engineer approved in the MLflow UI.

Every 5 minutes: expire pending candidates older than approval_max_age_hours, then promote the
newest version with approval=approved that was never deployed (rollout target: local or helm),
moving champion / previous-champion only after the rollout succeeded. Nothing approves here:
the approval is the version tag an engineer sets in the MLflow UI (docs/runbook.md).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import dag, task

START_DATE = datetime(2026, 1, 1)
# I/O steps (S3, MLflow, rollout) retry with exponential backoff; checks that said no do not retry.
DEFAULT_ARGS = {
    "owner": "onerec-ml-platform",
    "retries": 3,
    "retry_delay": timedelta(seconds=20),
    "retry_exponential_backoff": 2.0,
    "max_retry_delay": timedelta(minutes=10),
}
NO_RETRY = {"retries": 0}


def config():
    """PipelineConfig from the environment, overridden by the Airflow Variable `onerec_fp8_config` (JSON)."""
    from airflow.sdk import Variable

    from tasks.config import AIRFLOW_VARIABLE, load_config

    return load_config(Variable.get(AIRFLOW_VARIABLE, default=None, deserialize_json=True) or None)


def run_step(fn, *args, **kwargs):
    """A pipeline step; a StepFailed (bad data, failed check) fails the task at once, without retries."""
    from airflow.sdk.exceptions import AirflowFailException

    from tasks.requantize import StepFailed

    try:
        return fn(*args, **kwargs)
    except StepFailed as exc:
        raise AirflowFailException(str(exc)) from None


@dag(
    dag_id="onerec_fp8_promote",
    schedule=timedelta(minutes=5),
    start_date=START_DATE,
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["onerec", "fp8", "promote"],
    doc_md=__doc__,
)
def onerec_fp8_promote():
    @task
    def expire_stale_candidates() -> dict:
        from tasks.approval import expire_stale

        return expire_stale(config())

    @task
    def promote_newest_approved() -> dict:
        from tasks.promote import promote_newest_approved

        return run_step(promote_newest_approved, config())

    expire_stale_candidates() >> promote_newest_approved()


onerec_fp8_promote()
