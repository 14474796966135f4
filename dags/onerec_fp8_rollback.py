"""onerec_fp8_rollback: on-call restores the previous champion (manual trigger only).

Trigger it from the Airflow UI ("Trigger DAG" shows the form): `reason` is required and recorded
on the version rolled back from (rollback_reason, rolled_back_at, rolled_back_by); `version` is
optional (default: the version with alias previous-champion). The rollout happens first; the
aliases move back only when it succeeded.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import Param, dag, task

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
    dag_id="onerec_fp8_rollback",
    schedule=None,
    start_date=START_DATE,
    catchup=False,
    max_active_runs=1,
    default_args={**DEFAULT_ARGS, "retries": 1},
    tags=["onerec", "fp8", "rollback", "on-call"],
    doc_md=__doc__,
    params={
        "reason": Param(type="string", minLength=3, title="Reason",
                        description="Why roll back (incident link, symptom). Recorded on the version."),
        "version": Param(None, type=["null", "string"], title="Version",
                         description="Registry version to restore; empty: the previous-champion alias."),
    },
)
def onerec_fp8_rollback():
    @task
    def rollback(**context) -> dict:
        from tasks.rollback import rollback

        params = context["params"]
        dag_run = context["dag_run"]
        by = getattr(dag_run, "triggering_user_name", None) or "airflow"
        return run_step(rollback, config(), params["reason"], params.get("version") or None, by=by)

    rollback()


onerec_fp8_rollback()
