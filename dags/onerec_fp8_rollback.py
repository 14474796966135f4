"""onerec_fp8_rollback: on-call restores the previous champion (manual trigger only).

Trigger it from the Airflow UI ("Trigger DAG" shows the form): `reason` is required and recorded
on the version rolled back from (rollback_reason, rolled_back_at, rolled_back_by); `version` is
optional (default: the version with alias previous-champion). The rollout happens first; the
aliases move back only when it succeeded.
"""

from __future__ import annotations

from airflow.sdk import Param, dag, task
from onerec_fp8_common import DEFAULT_ARGS, START_DATE, config, run_step


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
