"""onerec_fp8_promote: roll out what an approver approved in the MLflow UI.

Triggered by the asset `onerec_model_approved` (the approval relay posts it when the `approval`
tag is set on a version) and hourly as a safety net. Applies the approvers' decisions and
expiry to the versions' state records, then promotes the newest approved version whose
provenance verifies (rollout target: local or helm), moving champion / previous-champion only
after the rollout succeeded. With canary steps configured (config key `canary`) the version first
walks them beside the champion; a failed step rolls back, marks the version, mails on-call and
fails the run (tasks/canary.py). The run's timeout leaves room for the steps. A refused version (forged, tampered, dead, older than the champion)
fails the run, so on-call hears of it. Nothing approves here (docs/runbook.md).
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import Asset, AssetOrTimeSchedule, CronTriggerTimetable, dag, task
from onerec_fp8_common import DEFAULT_ARGS, NO_RETRY, ON_FAILURE, START_DATE, config, run_step

MODEL_APPROVED = Asset(name="onerec_model_approved")  # ops.airflow_events.MODEL_APPROVED


@dag(
    dag_id="onerec_fp8_promote",
    schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable("@hourly", timezone="UTC"), assets=[MODEL_APPROVED]),
    dagrun_timeout=timedelta(hours=6),  # a canary's steps (each up to its step_timeout_s) run inside
    on_failure_callback=ON_FAILURE,
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

    # a canary walk: steps of up to canary.step_timeout_s; a timeout stops it, which rolls back
    @task(**NO_RETRY, execution_timeout=timedelta(hours=5))
    def promote_newest_approved(reviewed: dict) -> dict:
        from tasks.promote import promote_newest_approved

        # a version the first task refused fails this run too
        cfg = config()
        return run_step(cfg, promote_newest_approved, cfg, reviewed_before=reviewed)

    promote_newest_approved(expire_stale_candidates())


onerec_fp8_promote()
