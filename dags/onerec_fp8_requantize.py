"""onerec_fp8_requantize: newest S3 checkpoint -> verify -> validate (GX) -> FP8 -> gates -> MLflow.

Runs @daily and whenever the training job publishes a checkpoint (the Asset
`onerec_checkpoint_published`, for s3://BUCKET/PREFIX/checkpoints/). Ends at registration: a version with alias `challenger` and
approval=pending when the gates pass, a run with the reports and no version when they fail.
A checkpoint already registered with the same recipe stops the run after `check_registered`.
GPU steps run in the worker by default; with ONEREC_GPU_EXECUTOR=kubernetes each one is a
KubernetesPodOperator pod asking for nvidia.com/gpu: 1 (image containers/Dockerfile.gpu-worker) that
shares the work folder through the PVC `onerec-pipeline-work`.
"""

from __future__ import annotations

import os
from datetime import timedelta

from airflow.sdk import Asset, AssetOrTimeSchedule, CronTriggerTimetable, dag, task
from onerec_fp8_common import DEFAULT_ARGS, GPU_STEP, NO_RETRY, ON_FAILURE, START_DATE, config, run_step

# The Asset the training job updates after `publish` (an asset event via Airflow's REST API:
# POST /api/v2/assets/events). A plain name, not an s3:// URI: parsing an s3 URI would import
# boto3 (the amazon provider's URI handler) every time this file is parsed.
CHECKPOINT_PUBLISHED = Asset(
    name="onerec_checkpoint_published",
    extra={"location": f"s3://{os.environ.get('ONEREC_S3_BUCKET') or 'onerec'}/"
                       f"{(os.environ.get('ONEREC_S3_PREFIX') or 'onerec-v2').strip('/')}/checkpoints/"},
)
# Where GPU steps run, read at parse time: in_process (default) or kubernetes (pods with a GPU).
GPU_EXECUTOR = os.environ.get("ONEREC_GPU_EXECUTOR") or "in_process"


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
)
def onerec_fp8_requantize():
    @task
    def find() -> dict:
        from tasks.requantize import find_step

        return find_step(config())

    @task
    def fetch(found: dict) -> dict:
        from tasks.requantize import fetch_step

        return fetch_step(config(), found)

    @task.short_circuit(**NO_RETRY)
    def check_registered(fetched: dict) -> bool:
        """False (skip the rest) when this checkpoint + recipe is already registered or failed before."""
        from tasks.requantize import existing_step

        return existing_step(config(), fetched) is None

    @task(**NO_RETRY)
    def validate(fetched: dict) -> dict:
        from tasks.requantize import validate_step

        return run_step(validate_step, config(), fetched)

    @task
    def register(fetched: dict, quantized: dict, quality: dict, latency: dict, validation: dict) -> dict:
        from airflow.sdk import get_current_context

        from tasks.requantize import register_step

        run_id = get_current_context()["run_id"]
        return register_step(config(), fetched, quantized, quality, latency, validation, run_name=run_id)

    found = find()
    fetched = fetch(found)
    go_on = check_registered(fetched)
    validation = validate(fetched)
    go_on >> validation

    if GPU_EXECUTOR == "kubernetes":
        quantized, quality, latency = _gpu_pods(fetched)
        validation >> quantized
    else:
        @task(**GPU_STEP)
        def quantize(fetched: dict) -> dict:
            from tasks.requantize import quantize_step

            return run_step(quantize_step, config(), fetched)

        @task(**GPU_STEP)
        def quality_gate(fetched: dict, quantized: dict) -> dict:
            from tasks.requantize import quality_step

            return run_step(quality_step, config(), fetched, quantized)

        @task(**GPU_STEP)
        def latency_gate(fetched: dict, quantized: dict) -> dict:
            from tasks.requantize import latency_step

            return run_step(latency_step, config(), fetched, quantized)

        quantized = quantize(fetched)
        validation >> quantized
        quality = quality_gate(fetched, quantized)
        latency = latency_gate(fetched, quantized)
    register(fetched, quantized, quality, latency, validation)


def _gpu_pods(fetched):
    """quantize / quality_gate / latency_gate as GPU pods running `onerec-fp8 pipeline exec STEP`."""
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from kubernetes.client import models as k8s

    image = os.environ.get("ONEREC_GPU_IMAGE") or "onerec-fp8-gpu:0.1.0"
    namespace = os.environ.get("ONEREC_K8S_NAMESPACE") or "onerec"
    state_dir = os.environ.get("ONEREC_STATE_DIR") or "/work/state"
    common = dict(
        image=image, namespace=namespace, do_xcom_push=True, get_logs=True, on_finish_action="delete_pod",
        container_resources=k8s.V1ResourceRequirements(limits={"nvidia.com/gpu": "1"}),
        env_vars={"ONEREC_STATE_DIR": state_dir},
        env_from=[k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name="onerec-pipeline-env"))],
        volumes=[k8s.V1Volume(name="work", persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(
            claim_name="onerec-pipeline-work"))],
        volume_mounts=[k8s.V1VolumeMount(name="work", mount_path=state_dir)],
        **GPU_STEP,
    )

    def pod(step: str, inputs: str):
        return KubernetesPodOperator(
            task_id=step, name=f"onerec-{step.replace('_', '-')}",
            cmds=["onerec-fp8"], arguments=["pipeline", "exec", step, "--inputs", inputs,
                                             "--xcom-file", "/airflow/xcom/return.json"],
            **common,
        )

    fetched_json = "{{ ti.xcom_pull(task_ids='fetch') | tojson }}"
    quantized_json = "{{ ti.xcom_pull(task_ids='quantize') | tojson }}"
    quantized = pod("quantize", '{"fetched": ' + fetched_json + "}")
    quality = pod("quality_gate", '{"fetched": ' + fetched_json + ', "quantized": ' + quantized_json + "}")
    latency = pod("latency_gate", '{"fetched": ' + fetched_json + ', "quantized": ' + quantized_json + "}")
    fetched >> quantized
    quantized >> [quality, latency]
    return quantized.output, quality.output, latency.output


onerec_fp8_requantize()
