"""Server life cycle: ready only after load + warm-up, refusal of altered models, graceful drain, CLI errors."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from serving_checkpoints import random_tiny_checkpoint, serve_in_thread, wait_ready

from onerec.errors import UserError
from onerec.serve.app import ServerConfig, create_app
from onerec.serve.model_store import load_served_model, parse_model_uri
from ops.processes import free_port

BODY = {"users": [{"history": [1, 2, 3]}], "k": 2, "beam": 4}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return random_tiny_checkpoint(tmp_path_factory.mktemp("life") / "ckpt", seed=5)


def gated_loader(load_gate: threading.Event, search_gate: threading.Event):
    """A loader that waits for `load_gate`, and whose searches wait for `search_gate`."""

    def loader(config):
        assert load_gate.wait(60)
        served = load_served_model(config.model_uri, "cpu", version="1")
        real = served.search

        def search(*args):
            assert search_gate.wait(60)
            return real(*args)

        served.search = search
        return served

    return loader


def reason(client) -> str:
    r = client.get("/v2/health/ready")
    return "ready" if r.status_code == 200 else r.json()["reason"]


def wait_for(predicate, timeout_s=30):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_ready_only_after_load_and_warm_up(checkpoint):
    load_gate, search_gate = threading.Event(), threading.Event()
    app = create_app(ServerConfig(model_uri=str(checkpoint), device="cpu"), loader=gated_loader(load_gate, search_gate))
    with serve_in_thread(app) as (url, _), httpx.Client(base_url=url, timeout=30) as client:
        assert client.get("/v2/health/live").status_code == 200  # live while loading
        assert client.get("/v2/health/ready").status_code == 503
        assert reason(client) == "loading model"
        r = client.post("/v1/recommend", json=BODY)
        assert r.status_code == 503 and "not ready" in r.json()["error"]
        assert client.get("/v2/models/onerec-v2-fp8").status_code == 503
        load_gate.set()
        wait_for(lambda: reason(client) == "warming up")  # loaded, warm-up request still computing
        assert client.get("/v2/health/ready").status_code == 503
        assert client.post("/v1/recommend", json=BODY).status_code == 503
        time.sleep(0.3)
        assert reason(client) == "warming up"
        search_gate.set()
        wait_ready(client, url, 30)
        assert client.post("/v1/recommend", json=BODY).status_code == 200
        assert "onerec_ready 1.0" in client.get("/metrics").text


def test_failed_warm_up_never_turns_ready(checkpoint):
    fatal = []

    def loader(config):
        served = load_served_model(config.model_uri, "cpu")

        def broken(*args):
            raise RuntimeError("kernel exploded")

        served.search = broken
        return served

    app = create_app(ServerConfig(model_uri=str(checkpoint), device="cpu"), loader=loader, on_fatal=fatal.append)
    with serve_in_thread(app) as (url, _), httpx.Client(base_url=url, timeout=30) as client:
        wait_for(lambda: fatal)
        assert client.get("/v2/health/ready").status_code == 503
        assert "kernel exploded" in reason(client)
        assert client.post("/v1/recommend", json=BODY).status_code == 503


def test_altered_or_unlisted_files_refuse_to_load(checkpoint, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(checkpoint, bad)
    table = np.load(bad / "semantic_ids.npy")
    table[0] = table[1][::-1]
    np.save(bad / "semantic_ids.npy", table)
    with pytest.raises(UserError, match="sha256"):
        load_served_model(str(bad), "cpu")

    unlisted = tmp_path / "unlisted"
    shutil.copytree(checkpoint, unlisted)
    np.save(unlisted / "extra.npy", np.zeros(3))
    with pytest.raises(UserError, match="not covered by the manifest"):
        load_served_model(str(unlisted), "cpu")

    # the server reports the refusal instead of serving
    fatal = []
    app = create_app(ServerConfig(model_uri=str(bad), device="cpu"), on_fatal=fatal.append)
    with serve_in_thread(app) as (url, _), httpx.Client(base_url=url, timeout=30) as client:
        wait_for(lambda: fatal)
        assert "sha256" in reason(client)


def test_model_uris():
    ref = parse_model_uri("models:/onerec-v2-fp8@champion")
    assert (ref.name, ref.alias, ref.version, ref.is_registry) == ("onerec-v2-fp8", "champion", None, True)
    assert ref.pinned_uri("4") == "models:/onerec-v2-fp8/4"
    assert parse_model_uri("models:/m/12").version == "12"
    for bad in ("", "models:/", "models:/m", "models:/m@", "models:/m/x", "s3://bucket/model", "/does/not/exist"):
        with pytest.raises(UserError):
            parse_model_uri(bad)


def test_graceful_shutdown_drains_in_flight_requests(checkpoint):
    import uvicorn

    from onerec.serve.server import _draining_server_class

    block = threading.Event()
    release = threading.Event()

    def loader(config):
        served = load_served_model(config.model_uri, "cpu")
        real = served.search

        def search(*args):
            if block.is_set():
                assert release.wait(60)
            return real(*args)

        served.search = search
        return served

    app = create_app(ServerConfig(model_uri=str(checkpoint), device="cpu"), loader=loader)
    port = free_port()
    server = _draining_server_class()(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=30),
        app.state.server, drain_seconds=0.5,
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            wait_for(lambda: server.started)
            wait_ready(client, url, 60)
            block.set()
            answer = {}
            in_flight = threading.Thread(target=lambda: answer.update(r=httpx.post(url + "/v1/recommend", json=BODY, timeout=60)))
            in_flight.start()
            wait_for(lambda: app.state.server.batcher.in_flight == 1)
            server.handle_exit(signal.SIGTERM, None)
            r = client.get("/v2/health/ready")  # still answering during the drain, but not ready
            assert r.status_code == 503 and r.json()["reason"] == "draining"
            time.sleep(0.8)  # past the drain: the server is shutting down, waiting for the request
            assert thread.is_alive()
            release.set()
            in_flight.join(30)
            assert answer["r"].status_code == 200 and answer["r"].json()["users"][0]["items"]
        thread.join(30)
        assert not thread.is_alive()
    finally:
        release.set()
        server.should_exit = True
        thread.join(30)


def test_cli_rejects_bad_arguments_with_one_line():
    for args, message in (
        (["--model-uri", "/does/not/exist", "--port", str(free_port())], "does not exist"),
        (["--model-uri", "models:/x@", "--port", str(free_port())], "expected models:/"),
        (["--model-uri", "models:/x/3", "--port", str(free_port())], "needs --model-digest"),
        (["--model-uri", "/tmp", "--port", str(free_port()), "--default-k", "9", "--default-beam", "4"], "default_k"),
        (["--model-uri", "/tmp", "--port", str(free_port()), "--body-timeout", "0"], "timeouts must be in"),
    ):
        done = subprocess.run([sys.executable, "-m", "onerec_fp8.cli", "serve", *args], capture_output=True, text=True, timeout=120)
        assert done.returncode == 1, done.stderr
        assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert done.stdout == ""


def test_cli_serves_and_stops_on_sigterm(checkpoint):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "onerec_fp8.cli", "serve", "--model-uri", str(checkpoint), "--port", str(port),
         "--model-version", "3", "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=30) as client:
            deadline = time.monotonic() + 120
            while True:
                assert proc.poll() is None, proc.stderr.read()
                try:
                    if client.get("/v2/health/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline
                time.sleep(0.1)
            assert client.post("/v1/recommend", json=BODY).json()["model"]["version"] == "3"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        result = json.loads(out)  # one JSON object on stdout; logs went to stderr
        assert result["stopped"] is True and result["version"] == "3"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_a_non_finite_embedding_row_or_weight_refuses_the_model(tmp_path):
    """Warm-up touches a few items; the loader checks every tensor, so the model never turns ready."""
    import torch

    from onerec.checkpoint import save_checkpoint
    from onerec.model import OneRecV2, OneRecV2Config

    cfg = OneRecV2Config.from_preset("tiny")
    for poisoned, value in (("embedding", float("nan")), ("weight", float("inf"))):
        torch.manual_seed(0)
        model = OneRecV2(cfg)
        params = dict(model.named_parameters())
        name = next(n for n in params if ("emb" in n) == (poisoned == "embedding") and params[n].dim() == 2)
        with torch.no_grad():
            params[name][-1, 0] = value  # one row of one tensor
        table = np.arange(30 * 3, dtype=np.int32).reshape(30, 3) % cfg.codebook_size
        folder = save_checkpoint(model, table, tmp_path / poisoned)
        with pytest.raises(UserError, match=f"tensor {name} has 1 value\\(s\\) that are not finite"):
            load_served_model(str(folder), "cpu")


def test_a_stop_as_the_stack_stops_servers_logs_no_traceback(checkpoint, tmp_path):
    """`stack down` and a rollout stop a server with ops.processes.stop_processes: one SIGTERM, so
    the server drains and shuts down its app (a second one would mean "exit now")."""
    from ops.processes import spawn_detached, stop_processes

    port = free_port()
    log_path = tmp_path / "server.log"
    record = spawn_detached([sys.executable, "-m", "onerec_fp8.cli", "serve", "--model-uri", str(checkpoint), "--port",
                             str(port), "--device", "cpu", "--drain-seconds", "0.5"], log_path)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            wait_for(lambda: _ready(client), timeout_s=120)
            assert client.post("/v1/recommend", json=BODY).status_code == 200
    finally:
        stop_processes([record], 30)
    text = log_path.read_text()
    assert "Application shutdown complete" in text
    assert "Traceback" not in text and "CancelledError" not in text, text[-3000:]


def _ready(client) -> bool:
    try:
        return client.get("/v2/health/ready").status_code == 200
    except httpx.TransportError:
        return False
