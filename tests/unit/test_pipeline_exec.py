"""The requantize DAG's GPU steps exactly as its Kubernetes pods run them, here on CPU.

The DAG is parsed in its kubernetes mode with an Airflow Variable `onerec_fp8_config` set (through
Airflow's environment-variable secrets backend); each pod's `onerec-fp8 ...` command is rendered
with the earlier steps' results and the worker's configuration (the DAG's macro) as Airflow renders
it, and run as a subprocess whose environment has no Variable and contrary values: quantize, then
the quality gate (on CPU, with its duration) and the latency gate (no FP8 GPU: measurable false,
with its duration). Each pod ran with the worker's effective configuration. The work folder is laid
out as the fetch step leaves it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import jinja2
import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[2]
PROFILE = ["age", "activity"]
PROBE = r"""
import json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(sys.argv[1])
assert not bag.import_errors, bag.import_errors
dag = bag.dags["onerec_fp8_requantize"]
pods = {t.task_id: [*t.cmds, *t.arguments] for t in dag.tasks if type(t).__name__ == "KubernetesPodOperator"}
# the worker's side of the render: the DAG's macro, as Airflow calls it when a pod starts
print(json.dumps({"pods": pods, "config": dag.user_defined_macros["onerec_config_json"]()}))
"""
# The Variable's overrides: thresholds that let a random tiny model pass
VARIABLE = {"quality_gate": {"max_relative_recall_drop": 1.0, "max_relative_ndcg_drop": 1.0, "min_topk_overlap": 0.0,
                            "beam_size": 8}}


@pytest.fixture(scope="module")
def worker(tmp_path_factory, fetched) -> dict:
    """The parsed DAG's pod commands and the worker's configuration JSON, with the Variable set."""
    home = tmp_path_factory.mktemp("airflow_home")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "ONEREC_", "MLFLOW_"))}
    env.update(AIRFLOW_HOME=str(home), AIRFLOW__CORE__LOAD_EXAMPLES="False", ONEREC_GPU_EXECUTOR="kubernetes",
               ONEREC_STATE_DIR=state_dir_of(fetched), AIRFLOW_VAR_ONEREC_FP8_CONFIG=json.dumps(VARIABLE),
               PYTHONPATH=os.pathsep.join([str(REPO / "dags"), str(REPO)]))
    done = subprocess.run([sys.executable, "-c", PROBE, str(REPO / "dags" / "onerec_fp8_requantize.py")],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def state_dir_of(fetched: dict) -> str:
    return str(Path(fetched["work_dir"]).parents[1])


@pytest.fixture(scope="module")
def fetched(tmp_path_factory) -> dict:
    """A checkpoint with profile features and its calibration table, where the fetch step puts them
    (the dict is a tasks.requantize.Fetched, which the steps check field by field)."""
    from onerec.checkpoint import save_checkpoint
    from onerec.manifest import manifest_digest
    from onerec.model import OneRecV2, OneRecV2Config

    work = tmp_path_factory.mktemp("state") / "pipeline" / "ckpt-1"
    cfg = OneRecV2Config.from_preset("tiny", profile_features=PROFILE)
    rng = np.random.default_rng(0)
    codes = rng.permutation(64**3)[:200]
    table = np.stack([codes // 4096, (codes // 64) % 64, codes % 64], 1).astype(np.int32)
    ckpt = save_checkpoint(OneRecV2(cfg), table, work / "checkpoint")
    rows = [(u, [int(i) for i in rng.integers(0, 200, rng.integers(3, 20))], int(rng.integers(0, 200)),
             float(rng.normal()), float(rng.normal())) for u in range(48)]
    pd.DataFrame(rows, columns=["user_id", "history", "target", *PROFILE]).to_parquet(work / "calibration.parquet")
    return {"checkpoint_id": "ckpt-1", "checkpoint_uri": "s3://onerec/onerec-v2/checkpoints/ckpt-1/",
            "checkpoint_dir": str(ckpt), "checkpoint_sha256": manifest_digest(ckpt),
            "calibration_uri": "s3://onerec/onerec-v2/calibration/2026-01-01/calibration.parquet",
            "calibration_path": str(work / "calibration.parquet"), "calibration_sha256": "0" * 64,
            "work_dir": str(work), "report_dir": str(work / "reports"), "skipped": [], "files": 4, "reused": False}


def run_pod(command: list[str], xcom: dict, config: str, tmp_path: Path, state_dir: str) -> dict:
    """Render the pod's command as Airflow does (xcom_pull | tojson, the config macro) and run it in
    a pod-like environment (the Secret's variables only, here contrary to the Variable); the XCom
    file is the result."""

    class TaskInstance:
        @staticmethod
        def xcom_pull(task_ids: str):
            return xcom[task_ids]

    rendered = [jinja2.Environment().from_string(arg).render(ti=TaskInstance, onerec_config_json=lambda: config)
                for arg in command]
    assert rendered[0] == "onerec-fp8"
    xcom_file = tmp_path / "return.json"
    rendered[rendered.index("--xcom-file") + 1] = str(xcom_file)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "ONEREC_", "MLFLOW_"))}
    env.update(ONEREC_STATE_DIR=state_dir, ONEREC_QUALITY_EVAL_REQUESTS="8",
               ONEREC_QUALITY_GATE=json.dumps({"max_relative_recall_drop": 0.0, "beam_size": 4}))
    done = subprocess.run([sys.executable, "-m", "onerec_fp8.cli", *rendered[1:]], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=600)
    assert done.returncode in (0, 3), done.stderr[-3000:]
    result = json.loads(xcom_file.read_text())
    assert result == json.loads(done.stdout)
    return result


def test_gpu_steps_run_as_the_pods_run_them(worker, fetched, tmp_path):
    from onerec.gate_verdict import GateVerdict
    from tasks.config import PipelineConfig, config_sha256
    from tasks.requantize import require_same_config

    pods, config = worker["pods"], worker["config"]
    assert set(pods) == {"quantize", "quality_gate", "latency_gate"}
    assert json.loads(config)["quality_gate"]["beam_size"] == 8  # the worker's config has the Variable in it
    worker_sha256 = hashlib.sha256(config.encode()).hexdigest()
    state_dir = state_dir_of(fetched)
    xcom = {"fetch": fetched}
    xcom["quantize"] = quantized = run_pod(pods["quantize"], xcom, config, tmp_path, state_dir)
    assert Path(quantized["quantized_dir"], "recipe.json").is_file() and quantized["eval_rows"] > 0
    assert quantized["eval_rows"] == 24  # the worker's default (all 24 held-out users), not the pod env's 8

    quality = GateVerdict.from_dict(run_pod(pods["quality_gate"], xcom, config, tmp_path, state_dir))
    assert quality.gate == "quality" and quality.passed
    assert quality.device == "cpu"  # "auto" resolved: no CUDA here
    assert quality.duration_s > 0
    reports = Path(fetched["report_dir"])
    report = json.loads((reports / "quality_gate.json").read_text())  # the full report the verdict was read from
    assert quality.report_json == str(reports / "quality_gate.json") and report["duration_s"] == quality.duration_s
    assert report["config"]["beam_size"] == 8 and report["config"]["max_relative_recall_drop"] == 1.0
    assert (reports / "quality_gate.png").is_file() and not (reports / "quality_gate").exists()

    latency = GateVerdict.from_dict(run_pod(pods["latency_gate"], xcom, config, tmp_path, state_dir))
    assert latency.gate == "latency" and latency.outcome == "unmeasured" and not latency.measured
    assert latency.duration_s is not None
    assert json.loads((reports / "latency_gate.json").read_text())["measurable"] is False

    # every pod ran with the worker's effective configuration, and the register step (in the worker,
    # with the same environment and Variable) checks exactly that
    assert {quantized["config_sha256"], quality.config_sha256, latency.config_sha256} == {worker_sha256}
    worker_cfg = PipelineConfig.from_env({"ONEREC_STATE_DIR": state_dir, "ONEREC_GPU_EXECUTOR": "kubernetes"}, VARIABLE)
    assert config_sha256(worker_cfg) == worker_sha256
    require_same_config(worker_cfg, quantize=quantized["config_sha256"], quality_gate=quality.config_sha256,
                        latency_gate=latency.config_sha256)


def test_register_refuses_gpu_results_of_another_configuration():
    from onerec.errors import UserError
    from tasks.config import PipelineConfig, config_sha256
    from tasks.requantize import require_same_config

    cfg = PipelineConfig.from_env({}, {"state_dir": "/srv/onerec"})
    ours, other = config_sha256(cfg), config_sha256(replace(cfg, recipe="fp8_static"))
    require_same_config(cfg, quantize=ours, quality_gate=ours, latency_gate=ours)
    with pytest.raises(UserError, match=r"step\(s\) \['latency_gate'\] ran with another configuration"):
        require_same_config(cfg, quantize=ours, quality_gate=ours, latency_gate=other)


def test_exec_rejects_inputs_that_are_not_the_steps(fetched, tmp_path):
    done = subprocess.run([sys.executable, "-m", "onerec_fp8.cli", "pipeline", "exec", "quality_gate",
                           "--inputs", json.dumps({"fetch": fetched})], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "ONEREC_STATE_DIR": str(tmp_path)}, timeout=300)
    assert done.returncode == 1 and "missing ['quantize']" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    done = subprocess.run([sys.executable, "-m", "onerec_fp8.cli", "pipeline", "exec", "quantize",
                           "--inputs", json.dumps({"fetch": {**fetched, "surprise": 1}})], capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, "ONEREC_STATE_DIR": str(tmp_path)}, timeout=300)
    assert done.returncode == 1 and "unknown field(s) ['surprise']" in done.stderr
    # a worker configuration that puts the work folder outside the pod's mount: one line, no step run
    elsewhere = tmp_path / "elsewhere"
    done = subprocess.run([sys.executable, "-m", "onerec_fp8.cli", "pipeline", "exec", "quantize",
                           "--inputs", json.dumps({"fetch": fetched}), "--config", json.dumps({"state_dir": str(elsewhere)})],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, "ONEREC_STATE_DIR": str(tmp_path)},
                          timeout=300)
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert f"state_dir {elsewhere} is not this pod's work folder {tmp_path}" in done.stderr and not elsewhere.exists()


POD_SPEC = r"""
import json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(sys.argv[1])
assert not bag.import_errors, bag.import_errors
t = bag.dags["onerec_fp8_requantize"].get_task("quantize")
print(json.dumps({"image": t.image, "resources": t.container_resources.to_dict(), "node_selector": t.node_selector,
                  "tolerations": [x.to_dict() for x in t.tolerations], "startup": t.startup_timeout_seconds,
                  "finish": str(getattr(t.on_finish_action, "value", t.on_finish_action)),
                  "claim": t.volumes[0].persistent_volume_claim.claim_name,
                  "secret": t.env_from[0].secret_ref.name}))
"""


@pytest.mark.parametrize("pod", [
    {},
    {"requests": {"cpu": "16", "memory": "120Gi"}, "node_selector": {"nvidia.com/gpu.product": "NVIDIA-H200"},
     "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}],
     "startup_timeout_s": 2400, "keep_failed_pods": False, "work_claim": "work-rwx"},
])
def test_gpu_pods_take_their_scheduling_and_lifecycle_from_the_settings(pod, tmp_path):
    from onerec.settings import GpuPodConfig

    image = "registry.example:5000/onerec/onerec-fp8-gpu@sha256:" + "b" * 64
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(AIRFLOW_HOME=str(tmp_path), AIRFLOW__CORE__LOAD_EXAMPLES="False", ONEREC_GPU_EXECUTOR="kubernetes",
               ONEREC_GPU_IMAGE=image, ONEREC_GPU_POD=json.dumps(pod),
               PYTHONPATH=os.pathsep.join([str(REPO / "dags"), str(REPO)]))
    done = subprocess.run([sys.executable, "-c", POD_SPEC, str(REPO / "dags" / "onerec_fp8_requantize.py")],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    spec = json.loads(done.stdout.strip().splitlines()[-1])
    want = GpuPodConfig(**pod)
    assert spec["image"] == image
    assert spec["resources"]["requests"] == want.requests and spec["resources"]["limits"] == {**want.limits,
                                                                                            "nvidia.com/gpu": "1"}
    assert (spec["node_selector"] or {}) == want.node_selector
    assert [{k: v for k, v in t.items() if v is not None} for t in spec["tolerations"]] == want.tolerations
    assert spec["startup"] == want.startup_timeout_s and spec["startup"] >= 900  # a CUDA image pull
    assert spec["finish"] == ("delete_succeeded_pod" if want.keep_failed_pods else "delete_pod")
    assert (spec["claim"], spec["secret"]) == (want.work_claim, want.env_from)
