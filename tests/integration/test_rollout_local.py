"""The local rollout target: real server processes behind the local proxy, switched under live traffic."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from fixtures.stack import alive
from serving_checkpoints import random_tiny_checkpoint

from onerec.settings import Settings
from ops import rollout
from ops.processes import free_port
from ops.rollout import local

BODY = {"users": [{"history": [1, 2, 3, 4]}], "k": 3, "beam": 8}


def collapse(seq):
    out = []
    for x in seq:
        if not out or out[-1] != x:
            out.append(x)
    return out


@pytest.mark.slow
def test_local_target_replaces_and_rolls_back_with_no_failed_request(tmp_path):
    v1 = random_tiny_checkpoint(tmp_path / "v1", seed=11)
    v2 = random_tiny_checkpoint(tmp_path / "v2", seed=12)
    broken = tmp_path / "broken"
    shutil.copytree(v2, broken)
    np.save(broken / "semantic_ids.npy", np.zeros((3, 3), np.int32))  # no longer matches its manifest
    state = tmp_path / "state"
    settings = Settings(state_dir=str(state), local_serve_port=free_port())
    opts = dict(device="cpu")
    results: list = []
    stop = threading.Event()
    pids = []
    try:
        first = rollout.deploy(settings, str(v1), "1", **opts)
        assert first["revision"] == 1 and first["version"] == "1" and first["replaced"] is None
        url = first["url"]
        pids.append(first["pid"])
        assert httpx.get(url + "/v2/health/ready").status_code == 200

        def client_loop():  # one kept-alive connection to the stable endpoint, bounded in count and time
            deadline = time.monotonic() + 240
            with httpx.Client(timeout=30) as client:
                while not stop.is_set() and time.monotonic() < deadline and len(results) < 20_000:
                    try:
                        r = client.post(url + "/v1/recommend", json=BODY)
                        results.append((r.status_code, r.json()["model"]["version"] if r.status_code == 200 else r.text,
                                        r.json()["users"][0]["items"] if r.status_code == 200 else None))
                    except httpx.HTTPError as exc:
                        results.append(("error", repr(exc), None))

        def wait_more(n=20):
            target = len(results) + n
            deadline = time.monotonic() + 60
            while len(results) < target:
                assert time.monotonic() < deadline, "the client loop stalled"
                time.sleep(0.02)

        loop = threading.Thread(target=client_loop, daemon=True)
        loop.start()
        wait_more()

        before = len(results)
        second = rollout.deploy(settings, str(v2), "2", **opts)
        assert len(results) - before > 10, "no traffic during the switch"
        pids.append(second["pid"])
        assert second["revision"] == 2 and second["url"] == url and second["replaced"] == {"revision": 1, "version": "1"}
        wait_more()

        before = len(results)
        back = rollout.rollback(settings, device="cpu")
        assert len(results) - before > 10, "no traffic during the rollback"
        pids.append(back["pid"])
        assert back["revision"] == 3 and back["version"] == "1" and back["action"] == "rollback"
        wait_more()

        with pytest.raises(rollout.RolloutError, match="exited before it was ready"):
            rollout.deploy(settings, str(broken), "3", **opts)
        wait_more()
        stop.set()
        loop.join(30)

        failed = [r for r in results if r[0] != 200]
        assert not failed, failed[:5]
        versions = [r[1] for r in results]
        assert collapse(versions) == ["1", "2", "1"], collapse(versions)
        answers = {v: {tuple(r[2]) for r in results if r[1] == v} for v in ("1", "2")}
        assert len(answers["1"]) == 1 and len(answers["2"]) == 1  # v1 answers the same before and after
        assert answers["1"] != answers["2"]

        current = rollout.status(settings)
        assert current["revision"] == 3 and current["current"]["version"] == "1" and current["current"]["alive"]
        assert current["proxy_alive"] and [h["version"] for h in current["history"]] == ["1", "2", "1"]
        assert not alive([first["pid"], second["pid"]])
    finally:
        stop.set()
        stopped = local.stop(state)
    assert set(stopped["stopped"]) == {"current", "proxy"}
    assert not alive(pids), f"pids {alive(pids)} still running"


def test_rollback_with_no_earlier_revision_is_refused(tmp_path):
    with pytest.raises(rollout.RolloutError, match="nothing to roll back to"):
        rollout.rollback(Settings(state_dir=str(tmp_path)))
    assert rollout.pinned_uri("models:/onerec-v2-fp8@champion", 7) == "models:/onerec-v2-fp8/7"


def test_the_local_rollout_uses_the_callers_configuration_not_the_environment(tmp_path, monkeypatch):
    """The promote hands its configuration down: a non-default serving port and tracking URI reach
    the proxy and the serving child, whatever this process's environment says."""
    checkpoint = random_tiny_checkpoint(tmp_path / "v1", seed=21)
    env_port, port = free_port(), free_port()
    monkeypatch.setenv("ONEREC_LOCAL_SERVE_PORT", str(env_port))
    monkeypatch.setenv("ONEREC_STATE_DIR", str(tmp_path / "not-this-state"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9/not-this-one")
    settings = Settings(state_dir=str(tmp_path / "state"), local_serve_port=port,
                        mlflow_tracking_uri="http://127.0.0.1:5999/the-promotes")
    try:
        deployed = rollout.deploy(settings, str(checkpoint), "1", device="cpu")
        assert deployed["url"] == f"http://127.0.0.1:{port}"
        assert httpx.get(f"http://127.0.0.1:{port}/v2/health/ready").status_code == 200
        child_env = dict(line.split("=", 1) for line in
                         Path(f"/proc/{deployed['pid']}/environ").read_text().split("\0") if "=" in line)
        assert child_env["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5999/the-promotes"
        assert child_env["ONEREC_STATE_DIR"] == str(tmp_path / "state")
        assert (tmp_path / "state" / "serving" / "local.json").is_file()
        assert not (tmp_path / "not-this-state").exists()
    finally:
        local.stop(tmp_path / "state")
    assert not alive([deployed["pid"]])
