"""onerec_fp8_requantize: newest S3 checkpoint -> verify -> validate (GX) -> FP8 -> gates -> MLflow.

Runs @daily and whenever the training job publishes a checkpoint (the Asset
`onerec_checkpoint_published`, for s3://BUCKET/PREFIX/checkpoints/). Ends at registration: a
version with alias `challenger` and approval=pending when the gates pass, a run with the reports
and no version when they fail, are inconclusive or cannot measure (then the register task fails:
red in the Grid, on-call mailed with the reason and the run's link). A checkpoint already registered with the same recipe stops the run
after `check_registered`. The tasks are tasks.requantize.STEPS, in that order, each calling its
step function. GPU steps run in the worker by default; with ONEREC_GPU_EXECUTOR=kubernetes each
one is a KubernetesPodOperator pod asking for nvidia.com/gpu: 1 (image ONEREC_GPU_IMAGE, a full
reference, from containers/Dockerfile.gpu-worker) running `onerec-fp8 pipeline exec STEP --inputs
JSON`, sharing the work folder through a PVC; its requests, limits, node selector, tolerations,
start-up timeout and whether a failed pod is kept come from ONEREC_GPU_POD (onerec.settings.GpuPodConfig).
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import Asset, AssetOrTimeSchedule, CronTriggerTimetable, dag, task
from onerec_fp8_common import (
    DEFAULT_ARGS,
    GPU_STEP,
    NO_RETRY,
    ON_FAILURE,
    START_DATE,
    config,
    config_json,
    run_step,
)

from onerec.settings import Settings
from tasks.requantize import STEPS, Step, pod_arguments

# Read at parse time (stdlib only): where the Asset points, and where GPU steps run.
SETTINGS = Settings.from_env()
# The Asset the training job updates after `publish` (an asset event via Airflow's REST API:
# POST /api/v2/assets/events). A plain name, not an s3:// URI: parsing an s3 URI would import
# boto3 (the amazon provider's URI handler) every time this file is parsed.
CHECKPOINT_PUBLISHED = Asset(name="onerec_checkpoint_published", extra={"location": SETTINGS.checkpoints_uri})


def _python_task(step: Step):
    """The step as a TaskFlow task; check_registered short-circuits (skips the rest) when the registry has it."""
    options = {"task_id": step.name, **(GPU_STEP if step.gpu else {} if step.retries else NO_RETRY)}
    if step.name == "check_registered":
        @task.short_circuit(**options)
        def check_registered(fetched: dict) -> bool:
            cfg = config()
            return run_step(cfg, step.fn, cfg, fetched) is None

        return check_registered

    @task(**options)
    def run(*inputs: dict) -> dict:
        from airflow.sdk import get_current_context

        cfg = config()
        if step.name != "register":
            return run_step(cfg, step.fn, cfg, *inputs)
        from tasks.requantize import require_candidate

        # gates that did not pass fail this task once the run with the reports is logged
        result = run_step(cfg, step.fn, cfg, *inputs, run_name=get_current_context()["run_id"])
        return run_step(cfg, require_candidate, result)

    return run


def _gpu_pod(step: Step):
    """The step as a GPU pod running `onerec-fp8 pipeline exec STEP` with the earlier results as --inputs."""
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from kubernetes.client import models as k8s

    state_dir, pod = SETTINGS.state_dir, SETTINGS.gpu_pod
    inputs = "{" + ", ".join(f'"{name}": {{{{ ti.xcom_pull(task_ids={name!r}) | tojson }}}}'
                             for name in step.inputs) + "}"
    return KubernetesPodOperator(
        task_id=step.name, name=f"onerec-{step.name.replace('_', '-')}",
        # the worker's effective configuration (environment + Variable), rendered when the pod starts;
        # the pod's environment (the Secret) adds only the secrets
        cmds=["onerec-fp8"], arguments=pod_arguments(step.name, inputs, "{{ onerec_config_json() }}"),
        image=SETTINGS.gpu_image, namespace=SETTINGS.k8s_namespace, do_xcom_push=True, get_logs=True,
        # a failed pod stays for kubectl logs/describe (keep_failed_pods); a succeeded one goes
        on_finish_action="delete_succeeded_pod" if pod.keep_failed_pods else "delete_pod",
        startup_timeout_seconds=pod.startup_timeout_s,  # the CUDA image pull onto a fresh GPU node
        container_resources=k8s.V1ResourceRequirements(
            requests=dict(pod.requests), limits={**pod.limits, "nvidia.com/gpu": "1"}),
        node_selector=dict(pod.node_selector) or None,
        tolerations=[k8s.V1Toleration(**t) for t in pod.tolerations] or None,
        service_account_name=pod.service_account or None,
        env_vars={"ONEREC_STATE_DIR": state_dir},
        env_from=[k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=pod.env_from))],
        volumes=[k8s.V1Volume(name="work", persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(
            claim_name=pod.work_claim))],
        volume_mounts=[k8s.V1VolumeMount(name="work", mount_path=state_dir)],
        **GPU_STEP,
    )


@dag(
    dag_id="onerec_fp8_requantize",
    schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable("@daily", timezone="UTC"), assets=[CHECKPOINT_PUBLISHED]),
    start_date=START_DATE,
    catchup=False,
    max_active_runs=1,
    dagrun_timeout=timedelta(hours=8),
    on_failure_callback=ON_FAILURE,
    default_args=DEFAULT_ARGS,
    tags=["onerec", "fp8", "requantize"],
    doc_md=__doc__,
    user_defined_macros={"onerec_config_json": config_json},
)
def onerec_fp8_requantize():
    tasks: dict = {}  # step name -> its task (its XComArg for TaskFlow tasks)
    for step in STEPS:
        if step.gpu and SETTINGS.gpu_executor == "kubernetes":
            pod = _gpu_pod(step)
            for name in (*step.inputs, *step.after):
                tasks[name] >> pod
            tasks[step.name] = pod.output
        else:
            tasks[step.name] = _python_task(step)(*[tasks[name] for name in step.inputs])
            for name in step.after:
                tasks[name] >> tasks[step.name]


onerec_fp8_requantize()
