"""Settings shared by serving, ops tooling, the pipeline and the DAGs: one frozen dataclass.

Built from the environment (`Settings.from_env`) and an overrides dict (the Airflow Variable
`onerec_fp8_config`); `Settings.load()` also fills what the environment leaves unset from the
local stack's <state_dir>/stack.json, so commands work in a plain shell while `stack up` runs.
Nothing here writes os.environ: clients get endpoints and credentials passed explicitly
(`s3_client_kwargs`, `tracking_uri`, `subprocess_env`).

Each field reads the variable in ENV, else ONEREC_<FIELD>. Stdlib only: DAG files read it at
parse time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path

from onerec.errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
AIRFLOW_VARIABLE = "onerec_fp8_config"
STACK_FILE = "stack.json"

# field -> environment variable, where it is not ONEREC_<FIELD>
ENV = {
    "mlflow_tracking_uri": "MLFLOW_TRACKING_URI",
    "aws_access_key_id": "AWS_ACCESS_KEY_ID",
    "aws_secret_access_key": "AWS_SECRET_ACCESS_KEY",
    "aws_region": "AWS_DEFAULT_REGION",
    "kubeconfig": "KUBECONFIG",
}


class Secret(str):
    """The type of a field whose value is a secret (a key, a URL with a token in it): to_dict()
    leaves every such field out, whatever its name, and repr() never shows the value."""

    def __repr__(self) -> str:
        return "'***'"


def secret_fields(cls) -> tuple[str, ...]:
    """The fields of dataclass `cls` typed Secret (or Secret | None)."""
    hints = typing.get_type_hints(cls)
    return tuple(f.name for f in dataclasses.fields(cls)
                 if hints[f.name] is Secret or Secret in typing.get_args(hints[f.name]))


@dataclass(frozen=True)
class GpuPodConfig:
    """The Kubernetes pod of a GPU step of the requantize DAG (ONEREC_GPU_POD, a JSON object; the
    given keys replace these defaults). One GPU is always in the limits."""

    requests: dict = dataclasses.field(default_factory=lambda: {"cpu": "8", "memory": "48Gi"})
    limits: dict = dataclasses.field(default_factory=lambda: {"memory": "96Gi"})
    node_selector: dict = dataclasses.field(default_factory=dict)  # e.g. {"nvidia.com/gpu.product": "NVIDIA-H200"}
    tolerations: list = dataclasses.field(default_factory=lambda: [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])
    # a pod waits this long to start: pulling a CUDA image (several GiB) onto a fresh GPU node takes minutes
    startup_timeout_s: int = 1800
    keep_failed_pods: bool = True  # a failed pod stays for `kubectl logs/describe`; succeeded ones go
    service_account: str = ""  # "" = the namespace's default
    work_claim: str = "onerec-pipeline-work"  # the PVC the steps share their work folder through
    env_from: str = "onerec-pipeline-env"  # the Secret (by name) whose keys become the pod's environment

    def __post_init__(self) -> None:
        if not all(isinstance(x, dict) for x in (self.requests, self.limits, self.node_selector)):
            raise ValueError("requests, limits and node_selector must be JSON objects")
        if not isinstance(self.tolerations, list) or not all(isinstance(t, dict) for t in self.tolerations):
            raise ValueError("tolerations must be a list of JSON objects")
        if not 60 <= int(self.startup_timeout_s) <= 7200:
            raise ValueError("startup_timeout_s must be in 60..7200")


@dataclass(frozen=True)
class Settings:
    # where things live
    state_dir: str = str(REPO_ROOT / ".onerec")
    s3_endpoint_url: str | None = None  # None: real AWS
    s3_bucket: str = "onerec"
    s3_prefix: str = "onerec-v2"
    mlflow_tracking_uri: str | None = None  # None: MLflow's default (a local ./mlruns)
    model_name: str = "onerec-v2-fp8"
    # credentials for S3 (None: boto3's own chain); never logged (type Secret)
    aws_access_key_id: Secret | None = dataclasses.field(default=None, repr=False)
    aws_secret_access_key: Secret | None = dataclasses.field(default=None, repr=False)
    aws_region: str | None = None
    # MLflow account of this process: a 0600 JSON file {username, password} (Kubernetes: a mounted
    # Secret); None: <state_dir>/secrets/mlflow-service.json when it exists. MLFLOW_TRACKING_USERNAME
    # and _PASSWORD in the environment take precedence.
    mlflow_credentials_file: str | None = None
    # the read-only account `onerec-fp8 serve` downloads models:/ URIs with (onerec.serve.mlflow_login);
    # None: <state_dir>/secrets/mlflow-serving.json when it exists (the local stack writes it)
    mlflow_serving_credentials_file: str | None = None
    # the local stack's ports and the local serving endpoint
    s3_port: int = 9000
    mlflow_port: int = 5000
    airflow_port: int = 8080
    smtp_port: int = 8025  # the mail sink that receives failure notifications
    relay_port: int = 8090  # the approval relay (MLflow webhook -> Airflow asset event)
    local_serve_port: int = 8800
    # rollout: local processes or a Helm release
    rollout_target: str = "local"  # local | helm
    helm_release: str = "onerec-serving"
    helm_namespace: str = "onerec"
    helm_values: str = ""  # values files, os.pathsep-separated
    kube_context: str | None = None
    kubeconfig: str | None = None
    # where the GPU steps of the requantize DAG run: in the Airflow worker, or one Kubernetes pod per step
    gpu_executor: str = "in_process"  # in_process | kubernetes
    # built from containers/Dockerfile.gpu-worker; a full reference (registry, repository, tag or @digest)
    gpu_image: str = "ghcr.io/onerec-fp8/onerec-fp8-gpu:0.1.0"
    gpu_pod: GpuPodConfig = dataclasses.field(default_factory=GpuPodConfig)
    k8s_namespace: str = "onerec"
    # the Airflow that `publish` and the approval relay post asset events to (production: from a
    # Secret); None: the local stack's (stack.json), else none (the DAGs' schedules catch up)
    airflow_url: str | None = None
    airflow_username: str = ""
    airflow_password: Secret | None = dataclasses.field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.rollout_target not in ("local", "helm"):
            raise UserError(f"rollout target must be local or helm, not {self.rollout_target!r} (ONEREC_ROLLOUT_TARGET)")
        if self.gpu_executor not in ("in_process", "kubernetes"):
            raise UserError(f"gpu executor must be in_process or kubernetes, not {self.gpu_executor!r} (ONEREC_GPU_EXECUTOR)")
        name = self.gpu_image.split("@")[0].rsplit("/", 1)[-1]
        if "/" not in self.gpu_image or not ("@sha256:" in self.gpu_image or ":" in name) or name.endswith(":latest"):
            raise UserError(f"gpu image must be a full reference REGISTRY/REPOSITORY:TAG or @sha256:DIGEST, not "
                            f"{self.gpu_image!r} (ONEREC_GPU_IMAGE)")
        object.__setattr__(self, "s3_prefix", self.s3_prefix.strip("/"))

    # --- construction -------------------------------------------------------------------------------

    @classmethod
    def from_env(cls, env: typing.Mapping[str, str] | None = None, overrides: dict | None = None):
        """Defaults < environment (`env`, default os.environ) < `overrides` (e.g. the Airflow Variable)."""
        env = os.environ if env is None else env
        names = {f.name for f in dataclasses.fields(cls)}
        values = {name: env[var] for name in names if env.get(var := env_name(name)) not in (None, "")}
        unknown = set(overrides or {}) - names
        if unknown:
            raise UserError(f"unknown config keys {sorted(unknown)} (known: {sorted(names)})")
        values.update(overrides or {})
        return build(cls, values, "config")

    @classmethod
    def load(cls, overrides: dict | None = None, env: typing.Mapping[str, str] | None = None):
        """from_env, with the local stack's env (<state_dir>/stack.json) filling what `env` leaves unset."""
        env = dict(os.environ if env is None else env)
        stack = Path(env.get("ONEREC_STATE_DIR") or cls.state_dir) / STACK_FILE
        if stack.is_file():
            for key, value in json.loads(stack.read_text()).get("env", {}).items():
                env.setdefault(key, str(value))
        return cls.from_env(env, overrides)

    def to_dict(self) -> dict:
        """Every field, secrets left out: what a run logs."""
        secret = secret_fields(type(self))
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in secret}

    # --- what clients are given ---------------------------------------------------------------------

    @property
    def s3_root(self) -> str:
        return f"s3://{self.s3_bucket}/{self.s3_prefix}"

    @property
    def checkpoints_uri(self) -> str:
        return f"{self.s3_root}/checkpoints/"

    def tracking_uri(self) -> str | None:
        return self.mlflow_tracking_uri

    def s3_client_kwargs(self) -> dict:
        """endpoint_url, region and credentials for boto3.client("s3", ...) (None: boto3's defaults)."""
        return {"endpoint_url": self.s3_endpoint_url, "region_name": self.aws_region,
                "aws_access_key_id": self.aws_access_key_id, "aws_secret_access_key": self.aws_secret_access_key}

    def mlflow_credentials(self) -> dict | None:
        """{username, password} from mlflow_credentials_file (None: no such file, an MLflow without login)."""
        return _account(self.mlflow_credentials_file or Path(self.state_dir) / "secrets" / "mlflow-service.json")

    def mlflow_serving_credentials(self) -> dict | None:
        """{username, password} of the serving account (mlflow_serving_credentials_file), or None."""
        return _account(self.mlflow_serving_credentials_file or Path(self.state_dir) / "secrets" / "mlflow-serving.json")

    def subprocess_env(self, base: typing.Mapping[str, str] | None = None) -> dict[str, str]:
        """`base` (default os.environ) plus these settings as variables: the env of a child process
        (with the MLflow account, unless `base` names one already)."""
        env = dict(os.environ if base is None else base)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None and not dataclasses.is_dataclass(value) and not isinstance(value, dict):
                env[env_name(f.name)] = str(value)
        if not env.get("MLFLOW_TRACKING_USERNAME") and (creds := self.mlflow_credentials()):
            env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"] = creds["username"], creds["password"]
        return env


def _account(path: str | Path) -> dict | None:
    """{username, password} from a JSON credentials file (None: no such file, an MLflow without login)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        creds = json.loads(path.read_text())
        return {"username": str(creds["username"]), "password": str(creds["password"])}
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{path}: not a JSON object with username and password") from None


def env_name(field_name: str) -> str:
    return ENV.get(field_name, f"ONEREC_{field_name.upper()}")


def build(cls, values: dict, where: str):
    """An instance of dataclass `cls` from `values` (strings from the environment are coerced to the
    field types, JSON for nested dataclasses and dicts; a nested dataclass given as a dict changes its
    default in the fields it names); an unknown field is a one-line UserError."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise UserError(f"{where}: unknown field(s) {sorted(unknown)} (known: {sorted(fields)})")
    return cls(**{k: _coerce(f"{where}.{k}", hints[k], v, _default(fields[k])) for k, v in values.items()})


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def _coerce(where: str, kind, value, default=None):
    if value is None:
        return None
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    try:
        if dataclasses.is_dataclass(kind):
            if isinstance(value, kind):
                return value
            value = json.loads(value) if isinstance(value, str) else value
            if not isinstance(value, dict):
                raise ValueError("expected a JSON object")
            if dataclasses.is_dataclass(default):  # the given fields change the default, the rest stay
                unknown = set(value) - {f.name for f in dataclasses.fields(kind)}
                if unknown:
                    raise UserError(f"{where}: unknown field(s) {sorted(unknown)}")
                value = {**{f.name: getattr(default, f.name) for f in dataclasses.fields(kind)}, **value}
            return build(kind, value, where)
        if typing.get_origin(kind) is tuple:
            value = json.loads(value) if isinstance(value, str) and value.startswith("[") else value
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(int(x) for x in items if str(x).strip())
        if kind is Secret:
            return Secret(value)
        if not isinstance(value, str):
            return value
        if kind is bool:
            if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("1", "true", "yes")
        if kind in (int, float):
            return kind(value)
        if kind is dict:
            return json.loads(value)
    except (ValueError, TypeError) as exc:
        raise UserError(f"{where}: cannot read {value!r} as {getattr(kind, '__name__', kind)} ({exc})") from None
    return value
