"""The pipeline's configuration: the shared Settings plus the pipeline's own fields, one frozen dataclass.

Every field has a default for the local stack and reads ONEREC_<FIELD> from the environment
(shared fields: see onerec.settings.ENV, e.g. MLFLOW_TRACKING_URI); in Airflow the Variable
`onerec_fp8_config` (a JSON object of field -> value) overrides both: the DAG layer passes it as
`overrides` (tasks/ never imports Airflow). The gates' settings are the library's own config
dataclasses, given as JSON objects:

    ONEREC_QUALITY_GATE='{"max_relative_recall_drop": 0.02, "max_users": 512}'
    ONEREC_LATENCY_GATE='{"batch_sizes": [1, 8, 64]}'      (or Variable keys quality_gate / latency_gate)

A field the dataclass does not have is a one-line error. The resolved config is logged in every
MLflow run (secrets left out), so a decision can be traced to it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from onerec.engine.latency_gate import LatencyGateConfig
from onerec.errors import UserError
from onerec.quant.quality_gate import QualityGateConfig
from onerec.settings import AIRFLOW_VARIABLE, Secret, Settings
from ops.rollout.canary import CanaryConfig

__all__ = ["AIRFLOW_VARIABLE", "PipelineConfig", "config_json", "config_sha256", "load_config"]


@dataclass(frozen=True)
class PipelineConfig(Settings):
    # quantization
    recipe: str = "fp8_dynamic"  # a recipe name of onerec.quant.recipes (fp8_dynamic | fp8_static | fp8_block)
    # fp8_dynamic: "timed" keeps in bf16 the layers whose FP8 GEMM is slower on the quantize pod's
    # GPU at one user (onerec/engine/layer_choice.py; needs that GPU); "all": every selected layer FP8
    layer_choice: str = "all"
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
    # gates; quality_gate.device "auto": CUDA when there is a GPU, else CPU
    quality_gate: QualityGateConfig = field(default_factory=lambda: QualityGateConfig(device="auto"))
    latency_gate: LatencyGateConfig = field(default_factory=LatencyGateConfig)
    quality_eval_requests: int = 1024  # held-out calibration users the quality gate scores (at most), x positions
    latency_gate_blocking: bool = True  # production: a gate that cannot measure blocks; the local demo: False
    # promotion: the canary's steps and thresholds (ops.rollout.canary.CanaryConfig, a JSON object:
    # ONEREC_CANARY='{"weights": [5, 25, 100], "hold_s": 600}'); no weights: all traffic at once
    canary: CanaryConfig = field(default_factory=CanaryConfig)
    # approval
    approval_max_age_hours: float = 72.0  # a pending candidate older than this expires
    mlflow_approvers: str = "approver"  # MLflow accounts whose approval counts (comma-separated)
    # on-call notifications of failed DAG runs (tasks.notify)
    alert_smtp: str = ""  # host:port of the mail relay; the local stack sets its mail sink
    alert_smtp_starttls: bool = False  # upgrade to TLS (certificate verified) before anything is sent
    alert_smtp_ca_file: str = ""  # CA bundle of a relay with a private CA; empty: the system's
    alert_smtp_user: str = ""  # log in as this user (needs STARTTLS: never a password in clear)
    alert_smtp_password_file: str = ""  # the password, a 0600 file (Kubernetes: a mounted Secret)
    alert_email: str = "onerec-oncall@localhost"
    alert_from: str = "onerec-fp8-pipeline@localhost"
    # a JSON {"text"} webhook (chat, incident tool); empty: none. Its URL carries the token: a Secret
    alert_webhook_url: Secret = field(default=Secret(""), repr=False)
    # the provenance signing key: path of a 0600 file (Kubernetes: a mounted Secret), never the value
    provenance_key_file: str | None = None  # None: <state_dir>/secrets/provenance.key

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.alert_smtp_user and not self.alert_smtp_starttls:
            raise UserError("alert_smtp_user needs alert_smtp_starttls: the SMTP password would cross the network "
                            "in clear (ONEREC_ALERT_SMTP_STARTTLS=true)")
        if self.alert_smtp_user and not self.alert_smtp_password_file:
            raise UserError("alert_smtp_user needs alert_smtp_password_file (a 0600 file with the password)")

    @property
    def accepted_profile_uri(self) -> str:
        """The profile of the calibration data of the last approved version: the drift check's reference."""
        return f"{self.s3_root}/calibration/accepted/profile.json"

    def calibration_profile_uri(self, calibration_sha256: str) -> str:
        """The profile of a validated calibration table, under the table's digest (written once)."""
        return f"{self.s3_root}/calibration/profiles/{calibration_sha256}.json"

    @property
    def work_dir(self) -> Path:
        """Local scratch for a run's downloads and outputs (shared by the in-process DAG tasks)."""
        return Path(self.state_dir) / "pipeline"

    @property
    def approvers(self) -> list[str]:
        return [name.strip() for name in self.mlflow_approvers.split(",") if name.strip()]


def load_config(overrides: dict | None = None) -> PipelineConfig:
    """The config of an entry point (CLI, DAG task, pod): environment (plus the local stack's env
    when it runs) and overrides. Everything below it gets the config as an argument."""
    return PipelineConfig.load(overrides)


def config_json(cfg: PipelineConfig) -> str:
    """Every field but the secrets, as canonical JSON: what a GPU pod gets as `--config`, so that it
    runs with the worker's effective configuration (its secrets come from its own mounted Secret)."""
    return json.dumps(cfg.to_dict(), sort_keys=True, separators=(",", ":"), default=str)


def config_sha256(cfg: PipelineConfig) -> str:
    """The digest of config_json: each GPU step's result carries it, the register step checks it."""
    return hashlib.sha256(config_json(cfg).encode()).hexdigest()
