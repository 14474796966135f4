"""The pipeline's configuration: one dataclass, read from the environment (the cross-area contract).

Every field has a default for the local stack. Contract variables keep their names
(ONEREC_S3_BUCKET, MLFLOW_TRACKING_URI, ...); every other field reads ONEREC_<FIELD> (e.g.
ONEREC_LATENCY_GATE_BLOCKING=false). In Airflow, the Variable `onerec_fp8_config` (a JSON object
of field -> value) overrides both: the DAG layer passes it as `overrides` (tasks/ never imports
Airflow). The resolved config is logged in every MLflow run, so a decision can be traced to it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from onerec.errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent

# field -> environment variable fixed by the cross-area contract (the rest: ONEREC_<FIELD>)
CONTRACT_ENV = {
    "state_dir": "ONEREC_STATE_DIR",
    "s3_endpoint_url": "ONEREC_S3_ENDPOINT_URL",
    "s3_bucket": "ONEREC_S3_BUCKET",
    "s3_prefix": "ONEREC_S3_PREFIX",
    "mlflow_tracking_uri": "MLFLOW_TRACKING_URI",
    "model_name": "ONEREC_MODEL_NAME",
    "rollout_target": "ONEREC_ROLLOUT_TARGET",
}
AIRFLOW_VARIABLE = "onerec_fp8_config"


@dataclass
class PipelineConfig:
    # where things live (contract variables)
    state_dir: str = str(REPO_ROOT / ".onerec")
    s3_endpoint_url: str | None = None  # None: real AWS
    s3_bucket: str = "onerec"
    s3_prefix: str = "onerec-v2"
    mlflow_tracking_uri: str | None = None  # None: read from <state_dir>/stack.json, else MLflow's default
    model_name: str = "onerec-v2-fp8"
    rollout_target: str = "local"  # local | helm
    # quantization
    recipe: str = "fp8_dynamic"  # a recipe name of onerec.quant.recipes (fp8_dynamic | fp8_static | fp8_block)
    # calibration-data validation (Great Expectations)
    min_calibration_rows: int = 64
    min_history_length: int = 1
    max_history_length: int = 0  # 0: the checkpoint's context_len
    max_profile_zscore: float = 10.0  # profile features within mean +- z * std of the training data
    max_unknown_item_fraction: float = 0.0  # history/target items absent from the semantic-id table
    max_popularity_kl: float = 0.5  # drift vs the previous accepted snapshot (KL divergence, nats)
    max_history_length_kl: float = 0.5
    max_unseen_category_fraction: float = 0.05  # categorical profile values outside the model's vocabulary
    max_category_kl: float = 0.5  # drift of each categorical feature's value distribution (nats)
    # gates: thresholds live in the gates' own configs; extra CLI flags for them go here
    quality_gate_args: str = ""  # e.g. "--max-recall-drop 0.02" (onerec-fp8 gate quality)
    latency_gate_args: str = ""  # (onerec-fp8 gate latency)
    quality_eval_requests: int = 1024  # held-out calibration requests the quality gate scores (at most)
    latency_gate_blocking: bool = True  # production: a gate that cannot measure blocks; the local demo: False
    # approval and rollout
    approval_max_age_hours: float = 72.0  # a pending candidate older than this expires
    # where the GPU steps run: in the Airflow worker, or as a Kubernetes pod per step
    gpu_executor: str = "in_process"  # in_process | kubernetes
    gpu_image: str = "onerec-fp8-gpu:0.1.0"  # built from containers/Dockerfile.gpu-worker
    k8s_namespace: str = "onerec"
    extra: dict = field(default_factory=dict)  # free-form knobs passed to steps (logged, never secrets)

    def __post_init__(self) -> None:
        if self.rollout_target not in ("local", "helm"):
            raise UserError(f"rollout_target must be local or helm, not {self.rollout_target!r}")
        if self.gpu_executor not in ("in_process", "kubernetes"):
            raise UserError(f"gpu_executor must be in_process or kubernetes, not {self.gpu_executor!r}")
        self.s3_prefix = self.s3_prefix.strip("/")

    # --- construction -------------------------------------------------------------------------------

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, overrides: dict | None = None) -> PipelineConfig:
        """Defaults < environment (`env`, default os.environ) < `overrides` (e.g. the Airflow Variable)."""
        env = os.environ if env is None else env
        values: dict = {}
        for f in dataclasses.fields(cls):
            if f.name == "extra":
                continue
            name = CONTRACT_ENV.get(f.name, f"ONEREC_{f.name.upper()}")
            if env.get(name) not in (None, ""):
                values[f.name] = env[name]
        unknown = set(overrides or {}) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise UserError(f"unknown pipeline config keys {sorted(unknown)}")
        values.update(overrides or {})
        return cls(**{k: _coerce(cls, k, v) for k, v in values.items()})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # --- derived places -----------------------------------------------------------------------------

    @property
    def s3_root(self) -> str:
        return f"s3://{self.s3_bucket}/{self.s3_prefix}"

    @property
    def checkpoints_uri(self) -> str:
        return f"{self.s3_root}/checkpoints/"

    @property
    def accepted_profile_uri(self) -> str:
        """The profile of the last accepted calibration snapshot: the reference for the drift check."""
        return f"{self.s3_root}/calibration/accepted/profile.json"

    @property
    def work_dir(self) -> Path:
        """Local scratch for a run's downloads and outputs (shared by the in-process DAG tasks)."""
        return Path(self.state_dir) / "pipeline"

    def tracking_uri(self) -> str | None:
        if self.mlflow_tracking_uri:
            return self.mlflow_tracking_uri
        stack = Path(self.state_dir) / "stack.json"
        if stack.is_file():
            return json.loads(stack.read_text()).get("env", {}).get("MLFLOW_TRACKING_URI")
        return None


def _coerce(cls, name: str, value):
    """Environment strings -> the field's type (bool/int/float/dict); other values pass through."""
    kind = {f.name: f.type for f in dataclasses.fields(cls)}[name]
    if not isinstance(value, str):
        return value
    try:
        if kind == "bool":
            if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("1", "true", "yes")
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
        if kind == "dict":
            return json.loads(value)
    except ValueError:
        raise UserError(f"pipeline config {name}: cannot read {value!r} as {kind}") from None
    return value


def load_config(overrides: dict | None = None) -> PipelineConfig:
    """The config for this process: environment plus overrides; the stack's env when running locally.

    When <state_dir>/stack.json exists (the local stack is up), its "env" mapping fills the contract
    variables the environment does not set, so `onerec-fp8 pipeline ...` works in a plain shell.
    """
    env = dict(os.environ)
    state_dir = Path(env.get("ONEREC_STATE_DIR") or REPO_ROOT / ".onerec")
    stack = state_dir / "stack.json"
    if stack.is_file():
        for k, v in json.loads(stack.read_text()).get("env", {}).items():
            env.setdefault(k, v)
            os.environ.setdefault(k, v)  # boto3 and mlflow read credentials/endpoints from here
    return PipelineConfig.from_env(env, overrides)
