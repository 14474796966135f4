"""What the onerec-fp8 DAGs share: start date, retry policy, timeouts, failure notifications, config
loading, step failure mapping.

Not a DAG file (listed in .airflowignore); the DAG files import it from the dags folder, which
Airflow puts on sys.path.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import BaseNotifier


class OnCallNotifier(BaseNotifier):
    """Failures -> mail / webhook to on-call (tasks.notify), one per failure.

    As a task's on_failure_callback (after its last retry): the DAG, the task, the run, the one-line
    error and the link to the task's log. As the DAG's: only a run that failed without a failed
    task (its dagrun_timeout, a deadlock), which no task callback reported.
    """

    def notify(self, context) -> None:
        from airflow.sdk.configuration import conf

        from tasks.notify import failure_message, send_failure

        dag_run = context.get("dag_run")
        dag_id = getattr(context.get("dag"), "dag_id", None) or getattr(dag_run, "dag_id", "?")
        run_id = context.get("run_id") or getattr(dag_run, "run_id", "?")
        ti = context.get("ti")
        reason = context.get("reason")
        if reason is None and ti is not None:  # a task's callback
            error = context.get("exception") or "the task failed"
            send_failure(*failure_message(dag_id, run_id, error, ti.log_url, task_id=ti.task_id), config())
        elif reason != "task_failure":  # the DAG's, for a run no task callback reported
            base_url = conf.get("api", "base_url", fallback="http://localhost:8080").rstrip("/")
            send_failure(*failure_message(dag_id, run_id, f"the DAG run failed: {reason or 'unknown reason'}",
                                          f"{base_url}/dags/{dag_id}/runs/{run_id}"), config())


START_DATE = datetime(2026, 1, 1)
# I/O steps (S3, MLflow, rollout) retry with exponential backoff; checks that said no do not retry.
DEFAULT_ARGS = {
    "owner": "onerec-ml-platform",
    "retries": 3,
    "retry_delay": timedelta(seconds=20),
    "retry_exponential_backoff": 2.0,
    "max_retry_delay": timedelta(minutes=10),
    # a hung step (GPU, Helm, S3) fails instead of holding max_active_runs=1 forever
    "execution_timeout": timedelta(minutes=30),
    "on_failure_callback": [OnCallNotifier()],  # after the last retry
}
NO_RETRY = {"retries": 0}
GPU_STEP = {"retries": 0, "execution_timeout": timedelta(hours=3)}  # quantize and the gates


ON_FAILURE = [OnCallNotifier()]


def config():
    """The DAG task's configuration, built once per task and handed to everything it calls:
    PipelineConfig from the environment, overridden by the Airflow Variable `onerec_fp8_config` (JSON)."""
    from airflow.sdk import Variable

    from onerec.settings import AIRFLOW_VARIABLE
    from tasks.config import load_config

    return load_config(Variable.get(AIRFLOW_VARIABLE, default=None, deserialize_json=True) or None)


def config_json() -> str:
    """The worker's effective configuration as a GPU pod gets it (`--config`; a DAG macro, rendered
    in the worker when the pod starts, so a Variable change reaches the pod as it reaches the worker)."""
    from tasks.config import config_json as as_json

    return as_json(config())


def run_step(cfg, fn, *args, **kwargs):
    """fn(*args, **kwargs), a pipeline step run with configuration `cfg`; a StepFailed (bad data,
    failed check, lost file) fails the task at once, without retries; S3 or MLflow still down after
    the clients' own retries ends the try with one line naming cfg's servers (the task's retries
    may find them back)."""
    from airflow.sdk.exceptions import AirflowException, AirflowFailException

    from tasks.errors import StepFailed
    from tasks.outages import outage_message

    try:
        return fn(*args, **kwargs)
    except StepFailed as exc:
        raise AirflowFailException(str(exc)) from None
    except Exception as exc:
        message = outage_message(exc, cfg)
        if message is None:
            raise
        raise AirflowException(message) from None
