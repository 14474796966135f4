"""`onerec-fp8 stack` for real: up -> healthy -> a DAG task reaches S3 and MLflow -> idempotent up
-> down leaves no process; a taken port or a failed start leaves no half-started stack."""

from __future__ import annotations

import json
import os
import socket
import textwrap
import time
from pathlib import Path

import httpx
import pytest
from fixtures.stack import alive, group_members, process_groups, processes_of, stack_cli, stack_pids

from onerec.errors import UserError
from ops.processes import free_port
from ops.stack import SERVICES, _port_free, read_state, stack_env, without_passwords

CONTRACT_VARS = {
    "ONEREC_STATE_DIR", "ONEREC_S3_ENDPOINT_URL", "ONEREC_S3_BUCKET", "ONEREC_S3_PREFIX", "MLFLOW_TRACKING_URI",
    "ONEREC_MODEL_NAME", "ONEREC_ROLLOUT_TARGET", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION", "MLFLOW_S3_ENDPOINT_URL", "ONEREC_MLFLOW_CREDENTIALS_FILE", "ONEREC_MLFLOW_APPROVERS",
    "ONEREC_PROVENANCE_KEY_FILE", "ONEREC_ALERT_SMTP", "ONEREC_LATENCY_GATE_BLOCKING", "ONEREC_LOCAL_SERVE_PORT",
}

# A task that uses only the env Airflow got from the stack to reach MLflow and write into S3.
PROBE_DAG = textwrap.dedent('''
    import pendulum
    from airflow.sdk import dag, task


    @dag(schedule=None, start_date=pendulum.datetime(2024, 1, 1), catchup=False, tags=["test"],
         default_args={"retries": 0}, is_paused_upon_creation=False)
    def stack_probe():
        @task
        def reach_s3_and_mlflow():
            import json
            import os
            import urllib.request

            import boto3

            with urllib.request.urlopen(os.environ["MLFLOW_TRACKING_URI"] + "/health", timeout=30) as reply:
                mlflow_status = reply.status
            env = {k: v for k, v in os.environ.items() if k.startswith(("ONEREC_", "MLFLOW_", "AWS_"))}
            boto3.client("s3", endpoint_url=os.environ["ONEREC_S3_ENDPOINT_URL"]).put_object(
                Bucket=os.environ["ONEREC_S3_BUCKET"], Key="stack-probe/result.json",
                Body=json.dumps({"mlflow_status": mlflow_status, "env": env}).encode())

        reach_s3_and_mlflow()


    stack_probe()
''')


def s3_client(env: dict):
    import boto3

    return boto3.client("s3", endpoint_url=env["ONEREC_S3_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"],
                        aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])


def check_endpoints(state: dict) -> None:
    """Each service answers on its own endpoint (not only through `stack status`)."""
    services, env = state["services"], state["env"]
    listing = httpx.get(f"{services['s3']['url']}/{env['ONEREC_S3_BUCKET']}?list-type=2&max-keys=0", timeout=30)
    assert listing.status_code == 200 and "<ListBucketResult" in listing.text
    assert httpx.get(services["mlflow"]["url"] + "/health", timeout=30).text.strip() == "OK"
    health = httpx.get(services["airflow"]["url"] + "/api/v2/monitor/health", timeout=30).json()
    for component in ("metadatabase", "scheduler", "triggerer", "dag_processor"):
        assert health[component]["status"] == "healthy", health
    assert httpx.get(services["relay"]["url"] + "/health", timeout=30).status_code == 200
    import smtplib

    with smtplib.SMTP("127.0.0.1", services["smtp"]["port"], timeout=30) as smtp:
        assert smtp.noop()[0] == 250


def check_credentials_are_private_and_required(state: dict) -> None:
    """stack.json and every credential file are 0600; MLflow answers nobody without a login."""
    import stat

    state_dir = Path(state["state_dir"])
    private = [state_dir / "stack.json", *sorted((state_dir / "secrets").iterdir()),
               Path(state["credentials"]["airflow"]["passwords_file"])]
    assert len(private) >= 6
    for path in private:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    url = state["services"]["mlflow"]["url"]
    assert httpx.get(f"{url}/api/2.0/mlflow/experiments/search?max_results=1", timeout=30).status_code == 401
    for role in ("approver", "viewer", "serving"):
        account = state["credentials"]["mlflow"][role]
        reply = httpx.get(f"{url}/api/2.0/mlflow/experiments/search?max_results=1", timeout=30,
                          auth=(account["username"], account["password"]))
        assert reply.status_code == 200, (role, reply.text)


def check_mlflow_artifacts_land_in_s3(env: dict, tmp_path: Path) -> None:
    from unittest import mock

    from mlflow.tracking import MlflowClient

    account = json.loads(Path(env["ONEREC_MLFLOW_CREDENTIALS_FILE"]).read_text())  # the service account
    login = {"MLFLOW_TRACKING_USERNAME": account["username"], "MLFLOW_TRACKING_PASSWORD": account["password"]}
    with mock.patch.dict(os.environ, login):
        client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
        run = client.create_run(client.create_experiment("stack-test"))
        artifact = tmp_path / "hello.txt"
        artifact.write_text("hello from the stack test\n")
        client.log_artifact(run.info.run_id, str(artifact))
    listing = s3_client(env).list_objects_v2(Bucket=env["ONEREC_S3_BUCKET"], Prefix="mlflow/")
    keys = [o["Key"] for o in listing.get("Contents", [])]
    assert any(k.endswith(f"{run.info.run_id}/artifacts/hello.txt") for k in keys), keys


def run_probe_dag(state: dict, timeout_s: float = 240) -> None:
    """Log in with the printed credentials, trigger the probe DAG and wait for its run to succeed."""
    url, cred = state["services"]["airflow"]["url"], state["credentials"]["airflow"]
    with httpx.Client(base_url=url, timeout=60) as client:
        token = client.post("/auth/token", json={"username": cred["username"], "password": cred["password"]})
        assert token.status_code in (200, 201), token.text
        client.headers["Authorization"] = f"Bearer {token.json()['access_token']}"
        deadline = time.monotonic() + timeout_s
        while client.get("/api/v2/dags/stack_probe").status_code != 200:
            assert time.monotonic() < deadline, "the probe DAG never showed up in Airflow"
            time.sleep(1)
        run = client.post("/api/v2/dags/stack_probe/dagRuns", json={"logical_date": None})
        assert run.status_code == 200, run.text
        run_id = run.json()["dag_run_id"]
        while (run_state := client.get(f"/api/v2/dags/stack_probe/dagRuns/{run_id}").json()["state"]) not in (
                "success", "failed"):
            assert time.monotonic() < deadline, f"probe DAG run still {run_state}"
            time.sleep(1)
    logs = "\n".join(p.read_text()[-3000:] for p in Path(state["state_dir"]).glob("airflow/logs/dag_id=stack_probe/**/*.log"))
    assert run_state == "success", logs


@pytest.mark.integration
@pytest.mark.slow
def test_stack_up_status_idempotent_down(tmp_path):
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "stack_probe.py").write_text(PROBE_DAG)
    state_dir = tmp_path / "state"
    ports = {s: free_port() for s in SERVICES}
    port_args = [arg for s in SERVICES for arg in (f"--{s}-port", str(ports[s]))]
    up = stack_cli("up", "--state-dir", str(state_dir), "--dags-folder", str(dags), *port_args)
    pids: list[int] = []
    groups: set[int] = set()
    try:
        assert up.returncode == 0, up.stderr[-4000:]
        state = read_state(state_dir)
        pids = stack_pids(state)
        assert json.loads(up.stdout) == without_passwords(state)  # stack.json is what `up` printed, with the passwords
        passwords = [state["credentials"]["airflow"]["password"],
                     *(account["password"] for account in state["credentials"]["mlflow"].values())]
        assert all(len(p) >= 12 and p not in up.stdout for p in passwords)
        env = stack_env(state)
        assert set(env) == CONTRACT_VARS
        assert env["ONEREC_S3_ENDPOINT_URL"] == env["MLFLOW_S3_ENDPOINT_URL"] == f"http://127.0.0.1:{ports['s3']}"
        assert env["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{ports['mlflow']}"
        assert env["ONEREC_STATE_DIR"] == str(state_dir.resolve())
        assert state["services"]["airflow"]["url"] == f"http://127.0.0.1:{ports['airflow']}"
        assert len(state["services"]["airflow"]["pids"]) == 4  # api-server, scheduler, dag-processor, triggerer
        # The banner names the 0600 files that hold the UI passwords, never the passwords, and the stop command.
        airflow_cred, approver = state["credentials"]["airflow"], state["credentials"]["mlflow"]["approver"]
        assert airflow_cred["passwords_file"] in up.stderr and approver["file"] in up.stderr
        assert airflow_cred["password"] not in up.stderr and approver["password"] not in up.stderr
        assert state["stop_command"] in up.stderr
        check_credentials_are_private_and_required(state)

        status = stack_cli("status", "--state-dir", str(state_dir), timeout=60)
        assert status.returncode == 0, status.stderr
        report = json.loads(status.stdout)
        assert report["healthy"] is True
        assert all(report["services"][s]["healthy"] for s in SERVICES), report

        check_endpoints(state)
        check_mlflow_artifacts_land_in_s3(env, tmp_path)
        run_probe_dag(state)
        probe = json.loads(s3_client(env).get_object(Bucket=env["ONEREC_S3_BUCKET"], Key="stack-probe/result.json")["Body"].read())
        assert probe["mlflow_status"] == 200
        for name in CONTRACT_VARS:
            assert probe["env"][name] == env[name], name

        t0 = time.monotonic()
        again = stack_cli("up", "--state-dir", str(state_dir), timeout=120)
        assert again.returncode == 0, again.stderr[-4000:]
        assert time.monotonic() - t0 < 30
        assert "reused" in again.stderr
        again_state = json.loads(again.stdout)
        assert {s: again_state["services"][s]["pids"] for s in SERVICES} == {s: state["services"][s]["pids"] for s in SERVICES}
        pids = sorted(set(pids) | set(stack_pids(again_state)) | set(processes_of(state_dir)))
        groups = process_groups(pids)
        assert len(groups) >= 6  # one per started server process (s3, mlflow, 4 airflow) + task groups
    finally:
        down = stack_cli("down", "--state-dir", str(state_dir), timeout=180)
    assert down.returncode == 0, down.stderr[-4000:]
    assert json.loads(down.stdout)["running"] == []
    assert pids and alive(pids) == []
    assert group_members(groups) == []
    assert processes_of(state_dir) == []  # nothing that carries the stack's env is left
    assert all(_port_free(p) for p in ports.values())
    assert not (state_dir / "stack.json").exists()
    assert list((state_dir / "run").glob("*.json")) == []
    after = json.loads(stack_cli("status", "--state-dir", str(state_dir), timeout=60).stdout)
    assert after["healthy"] is False and not any(s["running"] for s in after["services"].values())


@pytest.mark.integration
def test_taken_port_is_a_clear_error_and_starts_nothing(tmp_path):
    ports = {"s3": free_port(), "mlflow": free_port()}
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", ports["mlflow"]))
        squatter.listen()
        result = stack_cli("up", "--state-dir", str(tmp_path), "--services", "s3,mlflow",
                           "--s3-port", str(ports["s3"]), "--mlflow-port", str(ports["mlflow"]), timeout=120)
    assert result.returncode == 1
    assert f"port {ports['mlflow']}" in result.stderr and "already in use" in result.stderr
    assert "--mlflow-port" in result.stderr and "Traceback" not in result.stderr
    # Checked before anything started: s3 was never started.
    assert processes_of(tmp_path) == []
    assert _port_free(ports["s3"])
    assert not (tmp_path / "stack.json").exists()
    assert list(tmp_path.glob("run/*.json")) == []


@pytest.mark.integration
def test_failed_start_stops_what_it_started(tmp_path):
    """MLflow dies at start after s3 came up: the error names MLflow's log and s3 is stopped too."""
    fake = tmp_path / "fake" / "mlflow"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "__main__.py").write_text("import sys\nprint('fake mlflow: cannot start')\nsys.exit(3)\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "fake")}
    state_dir = tmp_path / "state"
    ports = {"s3": free_port(), "mlflow": free_port()}
    result = stack_cli("up", "--state-dir", str(state_dir), "--services", "s3,mlflow",
                       "--s3-port", str(ports["s3"]), "--mlflow-port", str(ports["mlflow"]), timeout=180, env=env)
    assert result.returncode == 1
    mlflow_log = state_dir / "logs" / "mlflow.log"
    assert str(mlflow_log) in result.stderr and "Traceback" not in result.stderr.splitlines()[-1]
    assert "fake mlflow: cannot start" in mlflow_log.read_text()
    assert (state_dir / "logs" / "s3.log").is_file()  # s3 did start ...
    assert processes_of(state_dir) == []  # ... and was stopped again
    assert _port_free(ports["s3"])
    assert not (state_dir / "stack.json").exists()
    assert list(state_dir.glob("run/*.json")) == []


def test_status_and_read_state_without_a_stack(tmp_path):
    status = stack_cli("status", "--state-dir", str(tmp_path), timeout=60)
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["healthy"] is False
    assert set(report["services"]) == set(SERVICES)
    assert not any(s["running"] for s in report["services"].values())
    with pytest.raises(UserError, match="stack up"):
        read_state(tmp_path)


def test_cli_help_and_bad_service(tmp_path):
    helped = stack_cli("--help", timeout=60)
    assert helped.returncode == 0
    for word in ("up", "down", "status", "--state-dir", "--services", "--s3-port", "--mlflow-port", "--airflow-port"):
        assert word in helped.stdout
    bad = stack_cli("up", "--state-dir", str(tmp_path), "--services", "s3,redis", timeout=60)
    assert bad.returncode == 2 and "redis" in bad.stderr
    assert list(tmp_path.iterdir()) == []
