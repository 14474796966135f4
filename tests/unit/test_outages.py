"""Units of failing clean: one-line causes, the registry settling duplicate versions, zombies on stop."""

from __future__ import annotations

import sys
import time
from types import SimpleNamespace

import pytest

from ops.processes import free_port


def test_outage_message_names_the_server_that_is_down(monkeypatch):
    import requests
    from botocore.exceptions import EndpointConnectionError
    from mlflow.exceptions import MlflowException

    from onerec.settings import Settings
    from tasks.outages import outage_message as message_with

    dead_s3, dead_mlflow = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
    settings = Settings(s3_endpoint_url=dead_s3, mlflow_tracking_uri=dead_mlflow)

    def outage_message(exc):  # the step's configuration names the servers, not this process's environment
        return message_with(exc, settings)

    s3 = outage_message(EndpointConnectionError(endpoint_url=f"{dead_s3}/onerec/x"))
    assert s3.startswith(f"S3 ({dead_s3}): Could not connect") and "\n" not in s3
    # MLflow proxies artifacts: with S3 down, the artifact request fails at MLflow, the cause is S3
    proxied = MlflowException("API request to .../mlflow-artifacts/artifacts/x failed with exception "
                              "HTTPConnectionPool(...): Max retries exceeded\nmore lines")
    assert outage_message(proxied).startswith(f"S3 unreachable at {dead_s3}")
    settings = Settings(mlflow_tracking_uri=dead_mlflow)  # no S3 endpoint configured: MLflow is the one down
    assert outage_message(proxied) == f"MLflow unreachable at {dead_mlflow} after retries"
    assert outage_message(requests.exceptions.ConnectionError("refused")).startswith("MLflow unreachable")
    # the server killed while it answered: the response breaks off
    broken = MlflowException("API request to .../experiments/get-by-name failed with exception ('Connection broken: "
                             "IncompleteRead(0 bytes read, 269 more expected)', IncompleteRead(...))")
    assert outage_message(broken) == f"MLflow unreachable at {dead_mlflow} after retries"
    assert outage_message(MlflowException("RESOURCE_DOES_NOT_EXIST: no run\nx")) == (
        f"MLflow ({dead_mlflow}): RESOURCE_DOES_NOT_EXIST: no run")
    assert outage_message(ValueError("a bug")) is None  # not an outage: the traceback stays


class FakeRegistry:
    """Versions with tags, as MLflow's search/delete answer (enough for settle_duplicates)."""

    def __init__(self):
        self.versions: dict[str, dict] = {}

    def create(self, tags: dict) -> str:
        version = str(len(self.versions) + 1)
        self.versions[version] = tags
        return version

    def search_model_versions(self, filter_string):
        wanted = dict(part.split("=", 1) for part in filter_string.replace("'", "").split(" and "))
        wanted = {k.removeprefix("tags."): v for k, v in wanted.items() if k != "name"}
        return [SimpleNamespace(version=v, tags=t) for v, t in self.versions.items()
                if all(t.get(k) == x for k, x in wanted.items())]

    def delete_model_version(self, name, version):
        del self.versions[version]


def test_racing_registrations_leave_the_oldest_version(monkeypatch):
    from tasks.registration_claim import settle_duplicates

    cfg = SimpleNamespace(model_name="m")
    # every version here has no state record: the runs that created them are still registering
    monkeypatch.setattr("tasks.registration_claim.abandoned_registration", lambda cfg, c, mv: None)
    registry = FakeRegistry()
    tags = {"checkpoint_sha256": "abc", "recipe": "fp8_dynamic"}
    other = registry.create({"checkpoint_sha256": "def", "recipe": "fp8_dynamic"})
    first, second = registry.create(tags), registry.create(tags)  # both runs created a version
    assert settle_duplicates(registry, cfg, "abc", "fp8_dynamic", second) == first  # the loser deletes its own
    assert settle_duplicates(registry, cfg, "abc", "fp8_dynamic", first) == first  # the winner keeps its own
    assert sorted(registry.versions) == sorted([other, first])


def _registration_locks(tmp_path):
    from tasks.registration_claim import registration_lock

    cfg = SimpleNamespace(model_name="m", state_dir=str(tmp_path))
    # the same checkpoint with another recipe is not blocked
    return (lambda: registration_lock(cfg, "abc", "fp8_dynamic")), (lambda: registration_lock(cfg, "abc", "fp8_block"))


def _serving_locks(tmp_path):
    from tasks.promote import serving_change

    cfg, other = (SimpleNamespace(model_name=m, state_dir=str(tmp_path)) for m in ("m", "another-model"))
    # promote and rollback of one model take turns; another model's serving is not blocked
    return (lambda: serving_change(cfg)), (lambda: serving_change(other))


@pytest.mark.parametrize("locks", [_registration_locks, _serving_locks], ids=["registration", "serving"])
def test_host_locks_are_exclusive_per_key(tmp_path, locks):
    import threading

    same, other = locks(tmp_path)
    inside, order = threading.Event(), []

    def hold():
        with same():
            inside.set()
            time.sleep(0.3)
            order.append("first done")

    holder = threading.Thread(target=hold)
    holder.start()
    inside.wait(5)
    with other():
        order.append("other key")
    with same():
        order.append("second")
    holder.join()
    assert order == ["other key", "first done", "second"]


def test_stop_processes_skips_a_zombie_in_the_group(tmp_path):
    import psutil

    from ops.processes import spawn_detached, stop_processes

    # A parent that never reaps its exited child, like an interrupted `airflow dags test`.
    code = "import os, time\nif os.fork() == 0:\n    os._exit(0)\ntime.sleep(120)\n"
    record = spawn_detached([sys.executable, "-c", code], tmp_path / "log")
    parent = psutil.Process(record["pid"])
    deadline = time.monotonic() + 10
    while not [c for c in parent.children() if c.status() == psutil.STATUS_ZOMBIE]:
        assert time.monotonic() < deadline, "no zombie child appeared"
        time.sleep(0.05)
    stop_processes([record], grace_s=2)
    assert not parent.is_running() or parent.status() == psutil.STATUS_ZOMBIE


@pytest.mark.parametrize("value", ["http://127.0.0.1:1", None])
def test_no_tracking_server_is_a_one_line_error(tmp_path, monkeypatch, value):
    from onerec.errors import UserError
    from tasks.config import PipelineConfig
    from tasks.registry import use_tracking_server

    monkeypatch.chdir(tmp_path)
    cfg = PipelineConfig.from_env({}, {"state_dir": str(tmp_path / "state"), "mlflow_tracking_uri": value})
    if value is None:
        with pytest.raises(UserError, match="no MLflow tracking server configured"):
            use_tracking_server(cfg)
    else:
        assert use_tracking_server(cfg) == value
    assert list(tmp_path.iterdir()) == []
