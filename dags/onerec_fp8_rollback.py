"""onerec_fp8_rollback: on-call restores the previous champion (manual trigger only).

Trigger it from the Airflow UI ("Trigger DAG" shows the form): `reason` is required and recorded
on the version rolled back from (rollback_reason, rolled_back_at, rolled_back_by); `version` is
optional (default: the version with alias previous-champion; digits only, anything else is refused
by the form and, if it gets through, fails the run at once without a retry). Only a version that
was deployed and not rolled back, with verified provenance, is restored. The rollout happens
first; the aliases move back only when it succeeded.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import Param, dag, task
from onerec_fp8_common import DEFAULT_ARGS, ON_FAILURE, START_DATE, config, run_step


@dag(
    dag_id="onerec_fp8_rollback",
    schedule=None,
    start_date=START_DATE,
    catchup=False,
    max_active_runs=1,
    dagrun_timeout=timedelta(hours=1),
    on_failure_callback=ON_FAILURE,
    default_args={**DEFAULT_ARGS, "retries": 1},
    tags=["onerec", "fp8", "rollback", "on-call"],
    doc_md=__doc__,
    params={
        "reason": Param(type="string", minLength=3, title="Reason",
                        description="Why roll back (incident link, symptom). Recorded on the version."),
        "version": Param(None, type=["null", "string"], pattern="^[0-9]+$", title="Version",
                         description="Registry version number to restore; empty: the previous-champion alias."),
    },
)
def onerec_fp8_rollback():
    @task
    def rollback(**context) -> dict:
        from tasks.rollback import rollback

        params = context["params"]
        dag_run = context["dag_run"]
        by = getattr(dag_run, "triggering_user_name", None) or "airflow"
        cfg = config()
        return run_step(cfg, rollback, cfg, params["reason"], params.get("version") or None, by=by)

    rollback()


onerec_fp8_rollback()
