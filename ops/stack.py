"""`onerec-fp8 stack up|down|status`: the embedded local stack on loopback.

Five services, each a real server started as its own process group:

- s3:      s3rver (ops/s3/, Node.js), objects as files under <state dir>/s3/, so they survive
           `down`/`up` and a crash of the server; bucket `onerec` created at the first start;
- smtp:    a mail sink (ops.smtp_sink): the DAGs' failure notifications land in <state_dir>/mail/;
- mlflow:  MLflow tracking + registry with its basic-auth app (accounts and the approval rule:
           ops.mlflow_auth), SQLite in the state dir, artifacts proxied into s3;
- airflow: api-server, scheduler, dag-processor and triggerer (LocalExecutor, SQLite), dags
           folder = dags/ of this repo, with the stack's env so DAG tasks reach s3 and MLflow;
- relay:   the approval relay (ops.approval_relay): MLflow's registry webhook -> Airflow asset
           event, so an approval triggers the promote DAG at once.

The stack is a working deployment: the DAGs run unpaused (`--dags-paused` for a quiet one), and
`up` after `down` starts every service (and the local rollout's endpoint) on the ports of the last start (ports.json) with the same
secrets (secrets/, 0600: MLflow's webhook encryption key among them), then serves the local rollout
target's current revision again on its proxy port (ops.rollout.local.resume).

Everything lives in the state dir (default .onerec/ in the repo): logs/<process>.log, one
run/<process>.json per started process (written right after it starts, so `down` finds it even
if `up` died), and stack.json (URLs, env, credentials; see read_state/stack_env). `up` reuses
healthy services, so it is idempotent; `down` stops every process group it started and every
descendant that left its group (Airflow's task processes do), SIGKILL after a grace period.

One module, longer than most, on purpose: up/down/status and the three services' start and health
checks share the state files, the lock and the port resolution, and read best top to bottom.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
import typing
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from onerec.errors import UserError
from onerec.settings import Settings, env_name
from ops import mlflow_auth
from ops.approval_relay import register_webhook
from ops.processes import file_lock, is_alive, log_tail, spawn_detached, stop_processes
from ops.rollout import RolloutError
from ops.rollout.local import resume
from ops.rollout.local import stop as stop_local_serving

log = logging.getLogger("ops.stack")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_STATE_DIR = Path(Settings.state_dir)
SERVICES = ("s3", "smtp", "mlflow", "airflow", "relay")  # start order; `down` stops in reverse
DEFAULT_PORTS = {s: getattr(Settings, f"{s}_port") for s in SERVICES}
PORT_ENV = {s: env_name(f"{s}_port") for s in SERVICES}
LOCAL_SERVE = "local_serve"  # ports.json's key of the local rollout's endpoint
AIRFLOW_COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
AIRFLOW_USER = "admin"
# The local object store checks the access key id only: placeholders that keep boto3 from looking
# for real credentials (it binds loopback).
LOCAL_AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
STACK_FILE = "stack.json"
S3_SERVER = REPO_ROOT / "ops" / "s3" / "server.js"  # s3rver with durable writes (ops/s3/)

_abort = threading.Event()  # set when one of the parallel service starts failed


@dataclass
class StackConfig:
    """What `stack up/down/status` works on: the shared Settings (state dir, bucket, prefix, model
    name, rollout target, every port: Settings holds their defaults) and the stack's own fields."""

    settings: Settings = field(default_factory=Settings)
    ports: dict[str, int] | None = None  # service -> port; missing ones: running port, env, default
    # the services (and LOCAL_SERVE) whose port the environment set: those beat the port of the last start
    env_ports: frozenset[str] = frozenset()
    dags_folder: Path = REPO_ROOT / "dags"
    airflow_parallelism: int = 2
    dags_paused: bool = False  # DAGs new to Airflow start paused (a quiet stack, e.g. for tests)
    timeout_s: float = 180.0  # per service, until its health endpoint answers
    grace_s: float = 10.0  # SIGTERM -> SIGKILL

    @classmethod
    def from_env(cls, env: typing.Mapping[str, str] | None = None, state_dir: str | Path | None = None,
                 **overrides) -> StackConfig:
        """The entry point's config: Settings from `env` (default os.environ), the given overrides."""
        env = os.environ if env is None else env
        settings = Settings.from_env(env)
        settings = dataclasses.replace(settings, state_dir=str(Path(state_dir or settings.state_dir).resolve()))
        env_ports = frozenset(s for s in (*SERVICES, LOCAL_SERVE) if env.get(env_name(f"{s}_port")))
        cfg = cls(settings=settings, env_ports=env_ports)
        for key, value in overrides.items():
            if value is not None:
                setattr(cfg, key, value)
        cfg.dags_folder = Path(cfg.dags_folder).resolve()
        return cfg

    @property
    def state_dir(self) -> Path:
        return Path(self.settings.state_dir)


# ---------------------------------------------------------------------------------------------
# Public API (contract): stack.json and the env it gives to pipeline code


def read_state(state_dir: str | Path) -> dict:
    """The stack.json that `stack up` wrote: services (url, port, pids, logs), env, credentials."""
    path = Path(state_dir) / STACK_FILE
    if not path.is_file():
        raise UserError(f"no local stack state at {path}: run `onerec-fp8 stack up` first")
    return json.loads(path.read_text())


def without_passwords(state: dict) -> dict:
    """The state as `stack up` prints it: no "password" key at any depth of its credentials (each
    account names its 0600 file; stdout ends up in terminals and CI logs; stack.json, 0600 too,
    keeps the passwords)."""
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k != "password"}
        return value

    return {**state, "credentials": strip(state["credentials"])}


def stack_env(state: dict) -> dict[str, str]:
    """The configuration env of the local stack (ONEREC_*, MLFLOW_*, AWS_*), as strings."""
    return {str(k): str(v) for k, v in state["env"].items()}


def contract_env(cfg: StackConfig, ports: dict[str, int]) -> dict[str, str]:
    s3_url = f"http://127.0.0.1:{ports['s3']}"
    return {
        "ONEREC_STATE_DIR": str(cfg.state_dir),
        "ONEREC_S3_ENDPOINT_URL": s3_url,
        "ONEREC_S3_BUCKET": cfg.settings.s3_bucket,
        "ONEREC_S3_PREFIX": cfg.settings.s3_prefix,
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{ports['mlflow']}",
        "ONEREC_MODEL_NAME": cfg.settings.model_name,
        "ONEREC_ROLLOUT_TARGET": cfg.settings.rollout_target,
        "ONEREC_LOCAL_SERVE_PORT": str(cfg.settings.local_serve_port),
        **LOCAL_AWS_ENV,
        "MLFLOW_S3_ENDPOINT_URL": s3_url,
        "ONEREC_ALERT_SMTP": f"127.0.0.1:{ports['smtp']}",
        # the local gate policy (CPU, no FP8 GPU): an unmeasurable latency gate does not block; the
        # version is labelled gates=passed-latency-unmeasured and its page says NOT MEASURED
        "ONEREC_LATENCY_GATE_BLOCKING": "false",
        # paths of 0600 files, never the secrets themselves
        "ONEREC_MLFLOW_CREDENTIALS_FILE": str(mlflow_auth.credentials_file(cfg.state_dir, "service")),
        "ONEREC_MLFLOW_APPROVERS": mlflow_auth.APPROVER,
        "ONEREC_PROVENANCE_KEY_FILE": str(mlflow_auth.secrets_dir(cfg.state_dir) / "provenance.key"),
    }


# ---------------------------------------------------------------------------------------------
# Processes: run/<name>.json records, liveness, stopping whole trees


def _run_dir(cfg: StackConfig) -> Path:
    return cfg.state_dir / "run"


def _log_path(cfg: StackConfig, name: str) -> Path:
    return cfg.state_dir / "logs" / f"{name}.log"


def _records(cfg: StackConfig, service: str | None = None) -> list[dict]:
    records = []
    for path in sorted(_run_dir(cfg).glob("*.json")):
        with contextlib.suppress(OSError, json.JSONDecodeError):
            record = json.loads(path.read_text())
            if service is None or record["service"] == service:
                records.append(record)
    return records


def _spawn(cfg: StackConfig, name: str, service: str, port: int, cmd: list[str], env: dict) -> dict:
    log_path = _log_path(cfg, name)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
    # Own session = own process group, so `down` can signal the whole group at once.
    record = {"name": name, "service": service, "port": port,
              **spawn_detached(cmd, log_path, env=env, cwd=cfg.state_dir)}
    _run_dir(cfg).mkdir(parents=True, exist_ok=True)
    _write_json(_run_dir(cfg) / f"{name}.json", record)
    log.debug("started %s (pid %d): %s", name, record["pid"], " ".join(cmd))
    return record


def _stop(cfg: StackConfig, records: list[dict]) -> None:
    """Stop these records' processes and everything they spawned (see stop_processes), forget them."""
    stop_processes(records, cfg.grace_s)
    for record in records:
        with contextlib.suppress(FileNotFoundError):
            (_run_dir(cfg) / f"{record['name']}.json").unlink()


# ---------------------------------------------------------------------------------------------
# Health checks (plain urllib: `stack status` stays light)

_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy


def _http_get(url: str, timeout: float = 3.0) -> tuple[int, bytes] | None:
    try:
        with _opener.open(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""
    except (OSError, ValueError):
        return None


def _s3_healthy(url: str, bucket: str) -> bool:
    reply = _http_get(f"{url}/{bucket}?list-type=2&max-keys=0")
    return reply is not None and reply[0] == 200


def _mlflow_healthy(url: str) -> bool:
    reply = _http_get(url + "/health")
    return reply is not None and reply[0] == 200


def airflow_health(url: str) -> dict | None:
    """Airflow's /api/v2/monitor/health (metadatabase, scheduler, triggerer, dag_processor)."""
    reply = _http_get(url + "/api/v2/monitor/health")
    if reply is None or reply[0] != 200:
        return None
    try:
        return json.loads(reply[1])
    except json.JSONDecodeError:
        return None


def _airflow_healthy(url: str) -> bool:
    health = airflow_health(url)
    parts = ("metadatabase", "scheduler", "triggerer", "dag_processor")
    return health is not None and all((health.get(p) or {}).get("status") == "healthy" for p in parts)


def _smtp_healthy(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
            return sock.recv(64).startswith(b"220")
    except OSError:
        return False


def _service_healthy(service: str, url: str, cfg: StackConfig) -> bool:
    if service == "s3":
        return _s3_healthy(url, cfg.settings.s3_bucket)
    if service == "smtp":
        return _smtp_healthy(int(url.rsplit(":", 1)[1]))
    if service == "relay":
        reply = _http_get(url + "/health")
        return reply is not None and reply[0] == 200
    if service == "mlflow":
        return _mlflow_healthy(url)
    return _airflow_healthy(url)


def _wait(service: str, records: list[dict], ready: Callable[[], bool], timeout_s: float) -> None:
    """Block until `ready()`; a clear error naming the log file if a process exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        for record in records:
            if not is_alive(record):
                log.error("%s exited during start; last lines of %s:\n%s", record["name"], record["log"], log_tail(record["log"], lines=8))
                raise UserError(f"{service}: {record['name']} exited during start; see {record['log']}")
        if ready():
            return
        if _abort.is_set():
            raise UserError(f"{service}: start abandoned because another service failed to start")
        if time.monotonic() > deadline:
            logs = ", ".join(r["log"] for r in records)
            for record in records:
                log.error("last lines of %s:\n%s", record["log"], log_tail(record["log"], lines=8))
            raise UserError(f"{service} did not become healthy within {timeout_s:g}s; see {logs}")
        time.sleep(0.5)


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Like the servers themselves: a TIME_WAIT socket of a just-stopped server is no conflict.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# ---------------------------------------------------------------------------------------------
# Starting each service


def _base_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("AIRFLOW_CONFIG", None)
    # The servers' own console scripts (airflow spawns `airflow ...`) come from this venv.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["DO_NOT_TRACK"] = "true"
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _start_s3(cfg: StackConfig, port: int, env: dict) -> list[dict]:
    node = shutil.which("node")
    if node is None:
        raise UserError("s3: Node.js (`node`) is required for the local object store; install Node.js 18 or newer")
    if not (S3_SERVER.parent / "node_modules" / "s3rver").is_dir():
        raise UserError(f"s3: the object store is not installed: run `make install` "
                        f"(or `npm ci --prefix {S3_SERVER.parent}`)")
    url = f"http://127.0.0.1:{port}"
    # --openssl-legacy-provider: s3rver's ListObjectsV2 continuation tokens use DES
    cmd = [node, "--openssl-legacy-provider", str(S3_SERVER), "--directory", str(s3_data_dir(cfg.state_dir)),
           "--port", str(port), "--bucket", cfg.settings.s3_bucket, "--access-key-id", LOCAL_AWS_ENV["AWS_ACCESS_KEY_ID"]]
    record = _spawn(cfg, "s3", "s3", port, cmd, env)
    _wait("s3", [record], lambda: _s3_healthy(url, cfg.settings.s3_bucket), cfg.timeout_s)
    return [record]


def _start_mlflow(cfg: StackConfig, port: int, env: dict) -> list[dict]:
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{cfg.state_dir / 'mlflow.db'}",
        "--artifacts-destination", f"s3://{cfg.settings.s3_bucket}/mlflow",
        "--serve-artifacts", "--workers", "1", "--host", "127.0.0.1", "--port", str(port),
        "--app-name", "basic-auth",  # accounts and the approval rule: ops.mlflow_auth
    ]
    # The GenAI job runner (a pool of huey consumers) is of no use here and costs ~1 GB.
    env = {**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **mlflow_auth.server_env(cfg.state_dir)}
    record = _spawn(cfg, "mlflow", "mlflow", port, cmd, env)
    url = f"http://127.0.0.1:{port}"
    _wait("mlflow", [record], lambda: _mlflow_healthy(url), cfg.timeout_s)
    mlflow_auth.ensure_accounts(url, cfg.state_dir)
    return [record]


def s3_data_dir(state_dir: str | Path) -> Path:
    """The object store's files: one folder per bucket, an object per file. `stack down` keeps it."""
    return Path(state_dir) / "s3"


def airflow_home(state_dir: str | Path) -> Path:
    return Path(state_dir) / "airflow"


def _airflow_password(cfg: StackConfig) -> tuple[Path, str]:
    """The local admin's password: generated once per state dir, in the simple auth manager's file."""
    path = airflow_home(cfg.state_dir) / "simple_auth_manager_passwords.json"
    passwords = {}
    with contextlib.suppress(OSError, json.JSONDecodeError):
        passwords = json.loads(path.read_text())
    if AIRFLOW_USER not in passwords:
        passwords[AIRFLOW_USER] = secrets.token_urlsafe(12)
        mlflow_auth.write_private(path, json.dumps(passwords) + "\n")
    return path, passwords[AIRFLOW_USER]


def _airflow_env(cfg: StackConfig, port: int, env: dict, passwords_file: Path) -> dict:
    home = airflow_home(cfg.state_dir)
    url = f"http://127.0.0.1:{port}"
    return {
        **env,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(cfg.dags_folder),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        # a working deployment: schedules, asset events (an approval) and the safety nets run
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": str(cfg.dags_paused),
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": str(cfg.airflow_parallelism),
        "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": str(cfg.airflow_parallelism),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__CORE__AUTH_MANAGER": "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{AIRFLOW_USER}:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords_file),
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__API__BASE_URL": url,
        # Task processes report to the api-server through this URL (the default assumes :8080).
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{url}/execution/",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "10",  # new DAG files show up within seconds
        "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
        "AIRFLOW__SCHEDULER__STANDALONE_DAG_PROCESSOR": "True",
    }


def _start_airflow(cfg: StackConfig, port: int, env: dict) -> list[dict]:
    passwords_file, _ = _airflow_password(cfg)
    env = _airflow_env(cfg, port, env, passwords_file)
    # Migrate once, alone: it also writes airflow.cfg with the shared JWT/API secrets, which
    # four components starting at once would otherwise each generate differently.
    init_log = _log_path(cfg, "airflow-init")
    with open(init_log, "ab") as out:
        try:
            subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], stdout=out, stderr=subprocess.STDOUT,
                           stdin=subprocess.DEVNULL, env=env, cwd=cfg.state_dir, timeout=cfg.timeout_s, check=True)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            log.error("last lines of %s:\n%s", init_log, log_tail(init_log, lines=8))
            raise UserError(f"airflow: `airflow db migrate` failed ({exc}); see {init_log}") from None
    records = []
    for component in AIRFLOW_COMPONENTS:
        cmd = [sys.executable, "-m", "airflow", component]
        if component in ("scheduler", "triggerer"):
            # Their log servers bind every interface on fixed ports; the api-server reads the
            # task logs from AIRFLOW_HOME/logs directly, so the stack needs none.
            cmd.append("--skip-serve-logs")
        records.append(_spawn(cfg, f"airflow-{component}", "airflow", port, cmd, env))
    url = f"http://127.0.0.1:{port}"
    _wait("airflow", records, lambda: _airflow_healthy(url), cfg.timeout_s)
    return records


def _start_smtp(cfg: StackConfig, port: int, env: dict) -> list[dict]:
    cmd = [sys.executable, "-m", "ops.smtp_sink", "--port", str(port), "--maildir", str(cfg.state_dir / "mail")]
    record = _spawn(cfg, "smtp", "smtp", port, cmd, env)
    _wait("smtp", [record], lambda: _smtp_healthy(port), cfg.timeout_s)
    return [record]


def _start_relay(cfg: StackConfig, port: int, env: dict) -> list[dict]:

    secret_file = mlflow_auth.secrets_dir(cfg.state_dir) / "mlflow-webhook-secret"
    secret = mlflow_auth.secret_token(secret_file)
    cmd = [sys.executable, "-m", "ops.approval_relay", "--port", str(port), "--secret-file", str(secret_file),
           "--state-dir", str(cfg.state_dir)]
    record = _spawn(cfg, "relay", "relay", port, cmd, env)
    url = f"http://127.0.0.1:{port}"
    _wait("relay", [record], lambda: _service_healthy("relay", url, cfg), cfg.timeout_s)
    mlflow_url = env["MLFLOW_TRACKING_URI"]
    if not _mlflow_healthy(mlflow_url):
        raise UserError(f"relay: MLflow at {mlflow_url} is not running; start it with the relay")
    admin = mlflow_auth.credentials(cfg.state_dir, "admin")
    register_webhook(mlflow_url, (admin["username"], admin["password"]), url, secret,
                     id_file=cfg.state_dir / "relay-webhook-id")
    return [record]


_STARTERS = {"s3": _start_s3, "smtp": _start_smtp, "mlflow": _start_mlflow, "airflow": _start_airflow,
             "relay": _start_relay}


def _service_logs(cfg: StackConfig, service: str) -> str:
    names = [f"airflow-{c}" for c in ("init", *AIRFLOW_COMPONENTS)] if service == "airflow" else [service]
    if service == "relay":
        names.append("mlflow")  # the relay's start registers its webhook with MLflow
    return ", ".join(str(_log_path(cfg, name)) for name in names)


def _start_timed(cfg: StackConfig, service: str, port: int, env: dict) -> list[dict]:
    log.info("%s: starting on port %d (logs in %s)", service, port, cfg.state_dir / "logs")
    t0 = time.monotonic()
    try:
        records = _STARTERS[service](cfg, port, env)
    except UserError as exc:
        message = str(exc) if str(exc).startswith(service) else f"{service}: {exc}"
        if ".log" not in message:  # every failed start names where to look
            message += f"; see {_service_logs(cfg, service)}"
        raise UserError(message) from None
    except Exception as exc:  # a server's unexpected answer during its start: one line, not a traceback
        raise UserError(f"{service} did not start ({type(exc).__name__}: {exc}); see {_service_logs(cfg, service)}") from None
    log.info("%s: healthy after %.1fs", service, time.monotonic() - t0)
    return records


# ---------------------------------------------------------------------------------------------
# up / down / status


@contextlib.contextmanager
def _locked(cfg: StackConfig):
    """One `up`/`down` at a time per state dir."""
    with file_lock(cfg.state_dir / ".lock"):
        yield


def _last_ports(cfg: StackConfig) -> dict:
    """service -> port of the last start in this state dir (ports.json; `down` keeps it)."""
    with contextlib.suppress(OSError, json.JSONDecodeError):
        return json.loads((cfg.state_dir / "ports.json").read_text())
    return {}




def _resolve_ports(cfg: StackConfig) -> dict[str, int]:
    """Port per service: explicit (flag/ports) > the recorded (running or crashed) service's > env >
    the port of the last start in this state dir (so `up` after `down` comes back where it was) > default."""
    explicit = dict(cfg.ports or {})
    last = _last_ports(cfg)
    ports = {}
    for service in SERVICES:
        # A recorded server, alive or crashed: its port is the one stack.json and the clients know.
        running = [r["port"] for r in _records(cfg, service)]
        if service in explicit:
            ports[service] = int(explicit[service])
        elif running:
            ports[service] = running[0]
        elif service in cfg.env_ports or not isinstance(last.get(service), int):
            ports[service] = getattr(cfg.settings, f"{service}_port")  # env, else the default
        else:
            ports[service] = last[service]
    return ports


def _service_state(cfg: StackConfig, service: str) -> dict | None:
    records = _records(cfg, service)
    if not records:
        return None
    port = records[0]["port"]
    return {
        "url": f"http://127.0.0.1:{port}",
        "port": port,
        "pids": {r["name"]: r["pid"] for r in records},
        "logs": {r["name"]: r["log"] for r in records},
    }


def _write_json(path: Path, data: dict) -> None:
    mlflow_auth.write_private(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _write_state(cfg: StackConfig, ports: dict[str, int]) -> dict:
    services = {s: st for s in SERVICES if (st := _service_state(cfg, s)) is not None}
    credentials = {"s3": {"aws_access_key_id": LOCAL_AWS_ENV["AWS_ACCESS_KEY_ID"],
                          "aws_secret_access_key": LOCAL_AWS_ENV["AWS_SECRET_ACCESS_KEY"]}}
    if "airflow" in services:
        passwords_file, password = _airflow_password(cfg)
        credentials["airflow"] = {"username": AIRFLOW_USER, "password": password, "passwords_file": str(passwords_file)}
    if "mlflow" in services:
        credentials["mlflow"] = {role: {**mlflow_auth.credentials(cfg.state_dir, role),
                                        "file": str(mlflow_auth.credentials_file(cfg.state_dir, role))}
                                 for role in mlflow_auth.ACCOUNTS}
    script = Path(sys.executable).parent / "onerec-fp8"
    on_path = shutil.which("onerec-fp8") == str(script)
    stop = f"{'onerec-fp8' if on_path or not script.exists() else script} stack down"
    if cfg.state_dir != DEFAULT_STATE_DIR.resolve():
        stop += f" --state-dir {cfg.state_dir}"
    state = {
        "state_dir": str(cfg.state_dir),
        "services": services,
        "env": contract_env(cfg, ports),
        "credentials": credentials,
        "stop_command": stop,
    }
    if services:
        _write_json(cfg.state_dir / STACK_FILE, state)
        ports_now = {s: st["port"] for s, st in services.items()}
        _write_json(cfg.state_dir / "ports.json", {**_last_ports(cfg), **ports_now, LOCAL_SERVE: cfg.settings.local_serve_port})
    else:
        with contextlib.suppress(FileNotFoundError):
            (cfg.state_dir / STACK_FILE).unlink()
    return state


def up(cfg: StackConfig, services: tuple[str, ...] = SERVICES) -> dict:
    """Start the selected services (reusing healthy ones) and return the state written to stack.json."""
    services = tuple(s for s in SERVICES if s in services)
    with _locked(cfg):
        ports = _resolve_ports(cfg)
        last_serve_port = _last_ports(cfg).get(LOCAL_SERVE)
        if LOCAL_SERVE not in cfg.env_ports and isinstance(last_serve_port, int):
            # the endpoint of the last start: the champion comes back there
            cfg.settings = dataclasses.replace(cfg.settings, local_serve_port=last_serve_port)
        env = {**_base_env(), **contract_env(cfg, ports)}
        to_start = []
        for service in services:
            records = _records(cfg, service)
            url = f"http://127.0.0.1:{ports[service]}"
            if (records and all(is_alive(r) for r in records) and records[0]["port"] == ports[service]
                    and _service_healthy(service, url, cfg)):
                log.info("%s: already running and healthy at %s (reused)", service, url)
                continue
            if records:
                log.info("%s: stale or unhealthy processes from an earlier start: stopping them", service)
                _stop(cfg, records)
            to_start.append(service)
        # Check every port before starting anything: a taken port leaves no half-started stack.
        for service in to_start:
            if not _port_free(ports[service]):
                flag = f"--{service}-port"
                raise UserError(f"{service}: port {ports[service]} on 127.0.0.1 is already in use; "
                                f"pick another with {flag} or {PORT_ENV[service]}")
        try:
            # s3 first (the others write into its bucket), then the mail sink, MLflow and Airflow
            # side by side, the relay last (it registers its webhook with MLflow).
            if "s3" in to_start:
                _start_timed(cfg, "s3", ports["s3"], env)
            rest = [s for s in to_start if s not in ("s3", "relay")]
            try:
                with ThreadPoolExecutor(max_workers=max(1, len(rest))) as pool:
                    futures = [pool.submit(_start_timed, cfg, s, ports[s], env) for s in rest]
                    for future in as_completed(futures):
                        if future.exception() is not None:
                            _abort.set()  # the other start gives up instead of running to its timeout
            finally:
                _abort.clear()
            for future in futures:
                future.result()  # re-raises the first failure
            if "relay" in to_start:
                _start_timed(cfg, "relay", ports["relay"], env)
        except BaseException:
            # No half state: stop whatever this call started (reused services stay up).
            started = [r for r in _records(cfg) if r["service"] in to_start]
            if started:
                log.info("start failed: stopping the %d process(es) this call started", len(started))
                with contextlib.suppress(Exception):
                    _stop(cfg, started)
            _write_state(cfg, ports)
            raise
        state = _write_state(cfg, ports)
    if set(services) == set(SERVICES):
        _resume_local_serving(cfg, env)
    return state


def down(cfg: StackConfig, services: tuple[str, ...] = SERVICES) -> dict:
    """Stop the selected services (all by default) and everything they spawned."""
    with _locked(cfg):
        ports = _resolve_ports(cfg)
        records = [r for r in _records(cfg) if r["service"] in services]
        try:
            _stop(cfg, records)  # all at once, so the grace periods overlap
        except UserError:
            if set(services) == set(SERVICES):
                _stop_local_serving(cfg)  # the serving proxy goes down even when a service would not
            raise
        stopped = {}
        for record in records:
            stopped.setdefault(record["service"], []).append(record["pid"])
        for service, pids in stopped.items():
            log.info("%s: stopped (pids %s)", service, pids)
        state = _write_state(cfg, ports)
    result = {"state_dir": str(cfg.state_dir), "stopped": stopped, "running": sorted(state["services"])}
    if set(services) == set(SERVICES):
        result["serving"] = _stop_local_serving(cfg)
    return result


def _resume_local_serving(cfg: StackConfig, env: dict) -> None:
    """The local rollout target's champion serves again on its proxy port after a `down` (or a
    reboot): the stack is a working deployment, not only its services."""
    if cfg.settings.rollout_target != "local" or not (cfg.state_dir / "serving" / "local.json").is_file():
        return

    try:
        resumed = resume(Settings.from_env(env), env=env)  # the settings the stack hands its clients
    except RolloutError as exc:
        log.error("%s", exc)
        first = str(exc).splitlines()[0].rstrip(":")  # names the server's log; the tail went to the log above
        raise UserError(f"serving: the deployed version did not start again: {first}") from None
    if resumed and resumed["resumed"]:
        log.info("serving: version %s again on %s", resumed["version"], resumed["url"])


def _stop_local_serving(cfg: StackConfig) -> dict | None:
    """The local rollout target's server and proxy live in the same state dir: a full `down`
    leaves nothing of the local setup running."""
    if not (cfg.state_dir / "serving").is_dir():
        return None

    return stop_local_serving(cfg.state_dir)


def status(cfg: StackConfig) -> dict:
    """Each service's URL, processes and health; "healthy" is True when every running service is."""
    report = {}
    for service in SERVICES:
        state = _service_state(cfg, service)
        if state is None:
            report[service] = {"running": False, "healthy": False}
            continue
        records = _records(cfg, service)
        running = all(is_alive(r) for r in records)
        healthy = running and _service_healthy(service, state["url"], cfg)
        report[service] = {**state, "running": running, "healthy": healthy}
        if service == "airflow" and running:
            report[service]["components"] = airflow_health(state["url"])
    active = [r for r in report.values() if r["running"] or "url" in r]
    return {
        "state_dir": str(cfg.state_dir),
        "services": report,
        "healthy": bool(active) and all(r["healthy"] for r in active),
    }


def _print_banner(state: dict) -> None:
    services = state["services"]
    lines = ["", "Local stack is up:"]
    # passwords stay in their 0600 files: a banner ends up in terminals, CI logs and screenshots
    if "airflow" in services:
        cred = state["credentials"]["airflow"]
        lines.append(f"  Airflow UI  {services['airflow']['url']}   user {cred['username']}  "
                     f"password in {cred['passwords_file']}")
    if "mlflow" in services:
        accounts = state["credentials"]["mlflow"]
        lines.append(f"  MLflow UI   {services['mlflow']['url']}   approver: user {accounts['approver']['username']}  "
                     f"password in {accounts['approver']['file']}")
        lines.append(f"              read-only: user {accounts['viewer']['username']}  password in "
                     f"{accounts['viewer']['file']}; admin and pipeline service account: "
                     f"{Path(accounts['admin']['file']).parent}/mlflow-*.json")
        lines.append(f"              serving (read-only; `onerec-fp8 serve --model-uri models:/NAME/VERSION "
                     f"--model-digest D` finds it): {accounts['serving']['file']}")
    if "smtp" in services:
        lines.append(f"  Mail sink   127.0.0.1:{services['smtp']['port']}   failure notifications land in "
                     f"{state['state_dir']}/mail/")
    if "relay" in services:
        lines.append(f"  Approvals   {services['relay']['url']}/mlflow-webhook   (MLflow webhook -> promote DAG)")
    if "s3" in services:
        cred = state["credentials"]["s3"]
        lines.append(f"  S3          {services['s3']['url']}   bucket {state['env']['ONEREC_S3_BUCKET']}  "
                     f"keys {cred['aws_access_key_id']}/{cred['aws_secret_access_key']} (placeholders); "
                     f"objects in {s3_data_dir(state['state_dir'])}")
    lines.append("  Gate policy  latency_gate_blocking=false: without an FP8 GPU the latency gate cannot measure; "
                 "such a candidate is registered as gates=passed-latency-unmeasured (production blocks it)")
    lines += [f"  State, logs  {state['state_dir']}", f"  Stop with    {state['stop_command']}", ""]
    print("\n".join(lines), file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# CLI


def _services_arg(text: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in names if s not in SERVICES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown service(s) {unknown}; choose from {','.join(SERVICES)}")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("up", "down", "status"))
    parser.add_argument("--state-dir", type=Path, default=None,
                        help=f"state folder (env ONEREC_STATE_DIR; default {DEFAULT_STATE_DIR})")
    parser.add_argument("--services", type=_services_arg, default=SERVICES,
                        help=f"comma-separated subset of {','.join(SERVICES)} (default: all)")
    for service in SERVICES:
        parser.add_argument(f"--{service}-port", type=int, default=None,
                            help=f"{service} port (env {PORT_ENV[service]}; default {DEFAULT_PORTS[service]})")
    parser.add_argument("--dags-folder", type=Path, default=None, help="Airflow dags folder (default: dags/ of the repo)")
    parser.add_argument("--airflow-parallelism", type=int, default=None, help="Airflow task slots (default 2)")
    parser.add_argument("--dags-paused", action="store_true", default=None,
                        help="DAGs new to Airflow start paused (default: unpaused, they run on their schedules and events)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per service to become healthy (default 180)")


def main(args: argparse.Namespace) -> dict:
    ports = {s: getattr(args, f"{s}_port") for s in SERVICES if getattr(args, f"{s}_port") is not None}
    cfg = StackConfig.from_env(
        state_dir=args.state_dir, ports=ports, dags_folder=args.dags_folder,
        airflow_parallelism=args.airflow_parallelism, timeout_s=args.timeout, dags_paused=args.dags_paused,
    )
    if args.action == "up":
        state = up(cfg, args.services)
        _print_banner(state)
        return without_passwords(state)
    if args.action == "down":
        return down(cfg, args.services)
    return status(cfg)
