"""Faults on the local stack: servers killed (SIGKILL) and restarted, pipeline runs racing.

Each test starts its own S3 (+ MLflow) in its own state dir on free loopback ports, because it
kills them. Pipeline runs go through the real CLI in subprocesses, as an engineer or a cron job
would run them; they fail or succeed as a whole and print one line on failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fixtures.stack import stack_cli, start_stack

pytestmark = pytest.mark.integration

PASS_THRESHOLDS = {"max_relative_recall_drop": 10.0, "min_topk_overlap": 0.0}
RUN_TIMEOUT_S = 420
MB = 1 << 20


def s3_client(env: dict):
    import boto3

    return boto3.client("s3", endpoint_url=env["ONEREC_S3_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"],
                        aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])


def kill9(state_dir: Path, service: str) -> None:
    """SIGKILL the service's whole process group (MLflow's server runs its workers as children):
    a crash, no chance to flush or clean up."""
    from ops.stack import read_state

    pid = next(iter(read_state(state_dir)["services"][service]["pids"].values()))
    os.killpg(os.getpgid(pid), signal.SIGKILL)
    for _ in range(100):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


def restart(state_dir: Path, services: str, *port_args: str) -> None:
    """`stack up` again: it finds a killed server unhealthy and starts it on its recorded port."""
    result = stack_cli("up", "--state-dir", str(state_dir), "--services", services, *port_args, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]


def s3_alive(env: dict) -> bool:
    import httpx

    try:
        httpx.get(env["ONEREC_S3_ENDPOINT_URL"], timeout=5)
        return True
    except httpx.TransportError:
        return False


def listing(env: dict, prefix: str = "") -> dict[str, int]:
    client = s3_client(env)
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=env["ONEREC_S3_BUCKET"], Prefix=prefix):
        out.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
    return out


@pytest.mark.integration
def test_objects_survive_a_crash_and_stack_down_up(tmp_path):
    state_dir = tmp_path / "state"
    state = start_stack(state_dir, ("s3",))
    env = state["env"]
    try:
        client = s3_client(env)
        bucket = env["ONEREC_S3_BUCKET"]
        big = tmp_path / "weights.bin"
        big.write_bytes(os.urandom(70 * MB))  # above the 64 MiB multipart threshold: a multipart upload
        from tasks.checkpoints import upload_file

        upload_file(client, big, f"s3://{bucket}/ckpt/a/model.safetensors")
        for i in range(30):
            client.put_object(Bucket=bucket, Key=f"ckpt/a/part-{i:02d}.json", Body=json.dumps({"i": i}).encode())
        client.put_object(Bucket=bucket, Key="ckpt/a/manifest.json", Body=b"first")
        client.put_object(Bucket=bucket, Key="ckpt/a/manifest.json", Body=b"second")  # overwritten
        before = listing(env)
        assert len(before) == 32 and before["ckpt/a/model.safetensors"] == 70 * MB

        kill9(state_dir, "s3")
        restart(state_dir, "s3")
        assert listing(env) == before
        assert client.get_object(Bucket=bucket, Key="ckpt/a/manifest.json")["Body"].read() == b"second"
        # the listing pages in key order (the pipeline's "newest checkpoint" depends on it)
        keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix="ckpt/a/part-", PaginationConfig={"PageSize": 7}) for o in page["Contents"]]
        assert keys == sorted(keys) and len(keys) == 30

        down = stack_cli("down", "--state-dir", str(state_dir), timeout=120)
        assert down.returncode == 0, down.stderr[-2000:]
        assert not s3_alive(env)
        restart(state_dir, "s3", "--s3-port", str(state["services"]["s3"]["port"]))
        assert listing(env) == before
        restored = tmp_path / "restored.bin"
        client.download_file(bucket, "ckpt/a/model.safetensors", str(restored))
        assert restored.read_bytes() == big.read_bytes()
    finally:
        stack_cli("down", "--state-dir", str(state_dir), timeout=120)


# --- the pipeline through outages -----------------------------------------------------------------


def pipeline_env(state: dict, work: Path, name: str) -> dict[str, str]:
    return {
        **os.environ, **state["env"],
        "ONEREC_STATE_DIR": str(work), "ONEREC_S3_PREFIX": f"faults-{name}", "ONEREC_MODEL_NAME": f"onerec-faults-{name}",
        "MLFLOW_TRACKING_URI": state["env"]["MLFLOW_TRACKING_URI"],
        "ONEREC_LATENCY_GATE_BLOCKING": "false", "ONEREC_QUALITY_EVAL_REQUESTS": "64",
        "ONEREC_QUALITY_GATE": json.dumps({**PASS_THRESHOLDS, "max_users": 32}),
    }


def start_run(env: dict, log: Path) -> subprocess.Popen:
    out = open(log, "wb")  # noqa: SIM115 (the child writes to it; closed with the process)
    return subprocess.Popen([sys.executable, "-m", "onerec_fp8.cli", "pipeline", "run"], env=env, stdout=out,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def wait_for_line(proc: subprocess.Popen, log: Path, text: str, timeout_s: float = RUN_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in log.read_text(errors="replace"):
        assert proc.poll() is None, f"the run ended before {text!r}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {text!r} within {timeout_s}s"
        time.sleep(0.2)


def finish(proc: subprocess.Popen, log: Path) -> tuple[int, str, float]:
    t0 = time.monotonic()
    rc = proc.wait(timeout=RUN_TIMEOUT_S)
    return rc, log.read_text(errors="replace"), time.monotonic() - t0


def last_line(output: str) -> str:
    return [line for line in output.splitlines() if line.strip()][-1]


def registry(env: dict):
    """The registry as the pipeline's service account (the local MLflow requires a login)."""
    from tasks.config import PipelineConfig
    from tasks.registry import client

    return client(PipelineConfig.from_env(env))


def versions(env: dict) -> list:
    return list(registry(env).search_model_versions(f"name='{env['ONEREC_MODEL_NAME']}'"))


def runs(env: dict) -> list:
    from tasks.registry import EXPERIMENT

    c = registry(env)
    exp = c.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return []
    return list(c.search_runs([exp.experiment_id], f"tags.model_name = '{env['ONEREC_MODEL_NAME']}'"))


@pytest.mark.slow
def test_pipeline_through_s3_and_mlflow_crashes_then_racing_reruns(tmp_path, trained_tiny, monkeypatch):
    """S3, then MLflow, killed while a run registers: each run ends with one line naming the
    service, leaves no version and no gates=passed run; after a restart the data is all there,
    and two runs started at once register exactly one version."""
    state_dir = tmp_path / "state"
    state = start_stack(state_dir, ("s3", "mlflow"))
    work = tmp_path / "work"
    work.mkdir()
    env = pipeline_env(state, work, "crash")
    for key, value in state["env"].items():
        monkeypatch.setenv(key, value)  # publish (in this process) reaches the same S3
    try:
        from tasks.config import PipelineConfig
        from tasks.publish import publish

        cfg = PipelineConfig.from_env(env)
        publish(cfg, str(trained_tiny.checkpoint_dir), str(trained_tiny.calibration_path), "2026-01-01",
                "20260101T000000Z")
        published = listing(env, f"{cfg.s3_prefix}/")

        # 1. S3 dies while the run registers (MLflow stores the artifacts in it)
        run = start_run(env, tmp_path / "run1.log")
        wait_for_line(run, tmp_path / "run1.log", "waiting for the registration lock")
        kill9(state_dir, "s3")
        rc, output, took = finish(run, tmp_path / "run1.log")
        assert rc == 1, output[-3000:]
        assert "error: S3" in last_line(output) and "Traceback" not in output, output[-3000:]
        assert took < 240
        assert versions(env) == []
        assert all(not r.data.tags.get("gates", "").startswith("passed") for r in runs(env))
        assert any(r.data.tags.get("registration") == "failed" for r in runs(env))

        restart(state_dir, "s3")
        after = listing(env, f"{cfg.s3_prefix}/")
        assert {k: after.get(k) for k in published} == published  # + the accepted calibration profile

        # 2. MLflow dies while the run registers
        run = start_run(env, tmp_path / "run2.log")
        wait_for_line(run, tmp_path / "run2.log", "waiting for the registration lock")
        kill9(state_dir, "mlflow")
        rc, output, took = finish(run, tmp_path / "run2.log")
        assert rc == 1, output[-3000:]
        assert "error: MLflow unreachable" in last_line(output) and "Traceback" not in output, output[-3000:]
        assert took < 240

        restart(state_dir, "mlflow")
        assert versions(env) == []
        assert all(not r.data.tags.get("gates", "").startswith("passed") for r in runs(env))

        # 3. two runs at once on the same checkpoint and recipe: one version
        racing = [start_run(env, tmp_path / f"race{i}.log") for i in range(2)]
        results = [finish(proc, tmp_path / f"race{i}.log") for i, proc in enumerate(racing)]
        for rc, output, _ in results:
            assert rc == 0, output[-3000:]
        [version] = versions(env)
        # on CPU the latency gate cannot measure (the local config lets that pass; the label says so)
        assert version.tags["gates"] == "passed-latency-unmeasured" and version.tags["approval"] == "pending"
        outcomes = sorted(json.loads(last_line(output)).get("registered", False) for _, output, _ in results)
        assert outcomes == [False, True]
        assert registry(env).get_model_version_by_alias(env["ONEREC_MODEL_NAME"], "challenger").version == version.version
    finally:
        stack_cli("down", "--state-dir", str(state_dir), timeout=180)


def register_small_version(cfg, tmp_path: Path) -> str:
    """A version as the pipeline registers it (pyfunc + quantized folder with its manifest); approval
    pending (the server lets only an approver set it), which does not matter: the files are checked first."""
    import mlflow

    from onerec.manifest import write_manifest
    from tasks.registry import PYFUNC_CODE, client

    folder = tmp_path / "quantized"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(os.urandom(4096))
    (folder / "config.json").write_text("{}")
    write_manifest(folder)
    c = client(cfg)
    mlflow.set_experiment("storage-faults")
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="model", python_model=str(PYFUNC_CODE),
                                       artifacts={"quantized": str(folder)}, pip_requirements=["onerec-fp8"])
    version = mlflow.register_model(info.model_uri, cfg.model_name,
                                    tags={"gates": "passed", "approval": "pending"}).version
    assert c.get_model_version(cfg.model_name, version)
    return version


@pytest.mark.integration
def test_lost_artifact_is_named_and_changes_nothing(tmp_path, s3_and_mlflow, monkeypatch):
    """A version whose weights vanished from S3: promote and rollback name the version and the file,
    deploy nothing, move no alias, and are not retried; an unknown version is one line."""
    from onerec.errors import UserError
    from ops import rollout
    from ops.stack import stack_env
    from tasks.config import PipelineConfig
    from tasks.errors import StepFailed
    from tasks.promote import alias_version, promote
    from tasks.registry import client
    from tasks.rollback import rollback

    env = stack_env(s3_and_mlflow)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cfg = PipelineConfig.from_env(env, {"state_dir": str(tmp_path), "model_name": "onerec-lost-artifact"})
    c = client(cfg)
    champion = register_small_version(cfg, tmp_path / "a")
    c.set_registered_model_alias(cfg.model_name, "champion", champion)
    lost = register_small_version(cfg, tmp_path / "b")

    uri = c.get_model_version_download_uri(cfg.model_name, lost)
    assert uri.startswith("mlflow-artifacts:/"), uri  # proxied: s3://BUCKET/mlflow/<path>
    key = f"mlflow/{uri.split(':/', 1)[1].strip('/')}/artifacts/quantized/model.safetensors"
    assert key in listing(env, "mlflow/")
    s3_client(env).delete_object(Bucket=env["ONEREC_S3_BUCKET"], Key=key)

    def no_deploy(*args, **kwargs):
        raise AssertionError("nothing may be deployed")

    monkeypatch.setattr(rollout, "deploy", no_deploy)
    monkeypatch.setattr(rollout, "rollback", no_deploy)
    with pytest.raises(StepFailed, match=rf"version {lost}: artifacts/quantized/model.safetensors missing"):
        promote(cfg, lost)
    with pytest.raises(StepFailed, match=rf"version {lost}: .*model.safetensors missing"):
        rollback(cfg, "bad canary", version=lost)
    assert alias_version(c, cfg.model_name, "champion") == champion

    with pytest.raises(UserError, match="onerec-lost-artifact has no version 99$"):
        rollback(cfg, "typo", version="99")
    with pytest.raises(UserError, match="has no version 99$"):
        promote(cfg, "99")


def test_keys_that_leave_their_bucket_folder_are_refused(tmp_path):
    """`..` (or `.`) segments in a key would name a file of another bucket, of another key, or outside the store."""
    import socket

    from ops.stack import stack_env

    state_dir = tmp_path / "state"
    state = start_stack(state_dir, ("s3",))
    try:
        env = stack_env(state)
        client = s3_client(env)
        client.put_object(Bucket="onerec", Key="inside/ok.txt", Body=b"fine")
        host, port = env["ONEREC_S3_ENDPOINT_URL"].removeprefix("http://").split(":")
        for key in ("../escaped.txt", "../../escaped.txt", "a/../../escaped.txt", "inside/./ok.txt", "inside/x/../ok.txt"):
            # raw, so that no client normalises the path before the server sees it
            request = (f"PUT /onerec/{key} HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-length: 3\r\n"
                       "authorization: AWS testing:x\r\nconnection: close\r\n\r\nbad").encode()
            with socket.create_connection((host, int(port)), timeout=30) as sock:
                sock.sendall(request)
                answer = sock.recv(4096)
            assert not answer.startswith(b"HTTP/1.1 200"), (key, answer[:300])
        written = sorted(p.relative_to(state_dir).as_posix() for p in state_dir.rglob("*escaped*"))
        assert written == []
        assert client.get_object(Bucket="onerec", Key="inside/ok.txt")["Body"].read() == b"fine"
    finally:
        assert stack_cli("down", "--state-dir", str(state_dir), timeout=120).returncode == 0
