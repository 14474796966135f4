"""onerec_fp8_rollback: on-call restores the previous champion (manual trigger only).

Trigger it from the Airflow UI ("Trigger DAG" shows the form): `reason` is required and recorded
on the version rolled back from (rollback_reason, rolled_back_at, rolled_back_by); `version` is
optional (default: the version with alias previous-champion). The form takes any text: its first
task, check_form, checks both fields and fails the run at once (no retry) with one line that says
what to fix, where the form would otherwise answer with raw JSON-schema text. Only a version that
was deployed and not rolled back, with verified provenance, is restored. The rollout happens
first; the aliases move back only when it succeeded.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import Param, dag, task
from onerec_fp8_common import DEFAULT_ARGS, NO_RETRY, ON_FAILURE, START_DATE, config, run_step


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
    # Schemas that take whatever the form sends (text or empty): check_form says in one line what is
    # wrong, where a violated schema constraint would show jsonschema's raw text above the form.
    params={
        "reason": Param(None, type=["null", "string"], title="Reason (required)",
                        description="Why roll back, at least 3 characters: the incident link or the symptom, "
                                    "e.g. 'INC-42: p99 latency doubled'. Recorded on the version rolled back from."),
        "version": Param(None, type=["null", "string"], title="Version to restore (optional)",
                         description="A registry version number such as 12 (digits only). Leave empty to "
                                     "restore the version with alias previous-champion."),
    },
)
def onerec_fp8_rollback():
    @task(**NO_RETRY)
    def check_form(**context) -> dict:
        from tasks.rollback import rollback_request

        params = context["params"]
        reason, version = run_step(config(), rollback_request, params.get("reason"), params.get("version"))
        return {"reason": reason, "version": version}

    @task
    def rollback(request: dict, **context) -> dict:
        from tasks.rollback import rollback

        by = getattr(context["dag_run"], "triggering_user_name", None) or "airflow"
        cfg = config()
        return run_step(cfg, rollback, cfg, request["reason"], request["version"], by=by)

    rollback(check_form())


onerec_fp8_rollback()
