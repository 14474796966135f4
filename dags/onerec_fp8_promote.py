"""onerec_fp8_promote: roll out what an engineer approved in the MLflow UI.

Every 5 minutes: expire pending candidates older than approval_max_age_hours, then promote the
newest version with approval=approved that was never deployed (rollout target: local or helm),
moving champion / previous-champion only after the rollout succeeded. Nothing approves here:
the approval is the version tag an engineer sets in the MLflow UI (docs/runbook.md).
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import dag, task
from onerec_fp8_common import DEFAULT_ARGS, START_DATE, config, run_step


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
