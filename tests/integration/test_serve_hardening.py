"""The server under bad input and bad clients (loopback, bounded in time), and the loader's refusals.

Overflowing numbers are a 4xx and the connection stays usable; an escaping exception is a counted
500; a model with NaN or Inf weights never turns ready; slow clients are cut off by the header and
body timeouts while health checks keep answering; connection and in-flight caps answer 503 with
Retry-After; a disconnect is one debug line; manifests pointing outside their folder, symlinks
and absurd configs are refused before anything is allocated.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import select
import shutil
import socket
import threading
import time

import httpx
import pytest
import torch
from serving_checkpoints import random_tiny_checkpoint, serve_in_thread, wait_ready

from onerec.checkpoint import load_checkpoint, save_checkpoint
from onerec.errors import UserError
from onerec.manifest import write_manifest
from onerec.serve.app import ServerConfig, create_app
from onerec.serve.model_store import load_served_model

BODY = {"users": [{"history": [1, 2, 3]}], "k": 2, "beam": 4}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return random_tiny_checkpoint(tmp_path_factory.mktemp("hard") / "ckpt", seed=7)


def config(checkpoint, **kw) -> ServerConfig:
    return ServerConfig(model_uri=str(checkpoint), device="cpu", default_k=4, default_beam=8, max_wait_ms=2, **kw)


def wait_for(predicate, timeout_s=30):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def http_request(method: str, path: str, body: bytes = b"", headers: dict | None = None) -> bytes:
    head = [f"{method} {path} HTTP/1.1", "host: 127.0.0.1", f"content-length: {len(body)}"]
    head += [f"{k}: {v}" for k, v in (headers or {"content-type": "application/json"}).items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def read_response(sock: socket.socket) -> tuple[int, dict, bytes]:
    """(status, headers, body) of one response read off a raw socket (content-length framing)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    while len(rest) < int(headers.get("content-length", 0)):
        rest += sock.recv(65536)
    return int(lines[0].split()[1]), headers, rest


def metric(client, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_overflowing_profile_values_are_a_4xx_on_a_connection_that_stays_usable(checkpoint):
    app = create_app(config(checkpoint))
    with serve_in_thread(app) as (url, _), httpx.Client(base_url=url, timeout=30) as client:
        wait_ready(client, url)
        port = int(url.rsplit(":", 1)[1])
        valid = json.dumps({"users": [{"history": [1], "profile": {"age": 3.0e38}}], "k": 2, "beam": 4}).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            for bad in (b'{"users":[{"history":[1],"profile":{"age":3.4e39}}]}',
                        b'{"users":[{"history":[1],"profile":{"age":1e300}}]}',
                        b'{"users":[{"history":[1],"profile":{"activity":-1e300}}]}',
                        b'{"users":[{"history":[1],"profile":{"age":1e999}}]}'):
                sock.sendall(http_request("POST", "/v1/recommend", bad))
                status, _, body = read_response(sock)
                assert status == 422, body
                assert json.loads(body)["error"].startswith("invalid request: users.0.profile.")
                # the same keep-alive connection answers the next request
                sock.sendall(http_request("POST", "/v1/recommend", json.dumps(BODY).encode()))
                status, _, body = read_response(sock)
                assert status == 200 and len(json.loads(body)["users"][0]["items"]) == 2
            # within float32, absurd, still finite scores: answered
            sock.sendall(http_request("POST", "/v1/recommend", valid))
            assert read_response(sock)[0] == 200
            # headers beyond their size limit: 431 (and closed) before they reach the app
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nhost: x\r\n" + b"x-big: " + b"a" * 70_000 + b"\r\n\r\n")
            assert read_response(sock)[0] == 431
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:  # one header, trickled
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nx-big: ")
            for _ in range(200):  # 200 KB: far beyond the limit, unless answered first
                if select.select([sock], [], [], 0)[0]:
                    break
                try:
                    sock.sendall(b"a" * 1000)
                except ConnectionError:
                    break
                time.sleep(0.002)
            assert read_response(sock)[0] == 431
        assert metric(client, 'onerec_http_errors_total{code="500"}') == 0


def test_an_escaping_exception_is_a_counted_500_and_non_finite_scores_a_422(checkpoint):
    def loader(cfg):
        served = load_served_model(cfg.model_uri, "cpu")
        real = served.search

        def search(sids, mask, profile, beam, k):
            if beam == 3:
                raise RuntimeError("kernel exploded")
            recs = real(sids, mask, profile, beam, k)
            if beam == 6:  # what an input overflowing inside the model would give
                recs.scores.fill_(float("nan"))
            return recs

        served.search = search
        return served

    app = create_app(config(checkpoint), loader=loader)
    with serve_in_thread(app) as (url, _), httpx.Client(base_url=url, timeout=30) as client:
        wait_ready(client, url)
        r = client.post("/v1/recommend", json={**BODY, "beam": 3})
        assert r.status_code == 500 and r.json() == {"error": "internal server error"}
        assert client.post("/v1/recommend", json=BODY).status_code == 200  # same client, still serving
        r = client.post("/v1/recommend", json={**BODY, "beam": 6})
        assert r.status_code == 422 and "not finite" in r.json()["error"]
        assert metric(client, 'onerec_http_errors_total{code="500"}') == 1
        assert metric(client, 'onerec_http_responses_total{code="500",route="/v1/recommend"}') == 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_model_with_non_finite_weights_never_turns_ready(checkpoint, tmp_path, bad):
    model, table = load_checkpoint(checkpoint)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if n.endswith("weight") and p.ndim == 2).fill_(bad)
    broken = save_checkpoint(model, table, tmp_path / "broken")
    fatal = []
    app = create_app(config(broken), on_fatal=fatal.append)
    with serve_in_thread(app) as (url, _), httpx.Client(base_url=url, timeout=30) as client:
        wait_for(lambda: fatal)
        r = client.get("/v2/health/ready")
        assert r.status_code == 503 and "not finite" in r.json()["reason"]
        assert client.post("/v1/recommend", json=BODY).status_code == 503


def test_slow_clients_are_cut_off_while_health_checks_keep_answering(checkpoint):
    """200 connections trickle a body, 20 trickle headers, 20 say nothing: all are closed by the
    timeouts, and /v2/health/ready answers quickly throughout."""
    header_timeout, body_timeout = 2.0, 3.0
    app = create_app(config(checkpoint, header_timeout_s=header_timeout, body_timeout_s=body_timeout))
    with serve_in_thread(app) as (url, _), httpx.Client(base_url=url, timeout=30) as client:
        wait_ready(client, url)
        port = int(url.rsplit(":", 1)[1])
        health_ms: list[float] = []
        stop = threading.Event()

        def probe():
            with httpx.Client(base_url=url, timeout=5) as prober:
                while not stop.is_set():
                    t0 = time.perf_counter()
                    assert prober.get("/v2/health/ready").status_code == 200
                    health_ms.append((time.perf_counter() - t0) * 1000)
                    time.sleep(0.05)

        async def trickle(kind: str) -> tuple[str, float, bytes]:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            t0 = time.monotonic()
            if kind == "body":
                writer.write(http_request("POST", "/v1/recommend", b"")[:-4].replace(
                    b"content-length: 0", b"content-length: 1000") + b"\r\n\r\n{")
            answer = b""
            try:
                for i in range(60):  # at most 30 s: far beyond the timeouts
                    if kind == "headers":
                        writer.write(b"POST /v1/recommend HTTP/1.1\r\n" if i == 0 else b"x-slow: 1\r\n")
                    elif kind == "body":
                        writer.write(b" ")
                    await writer.drain()
                    try:
                        answer += await asyncio.wait_for(reader.read(4096), 0.5)
                    except TimeoutError:
                        continue
                    break  # an answer or EOF: the server closed it
            except ConnectionError:
                pass
            writer.close()
            return kind, time.monotonic() - t0, answer

        async def main():
            return await asyncio.gather(*[trickle("body") for _ in range(200)],
                                        *[trickle("headers") for _ in range(20)],
                                        *[trickle("idle") for _ in range(20)])

        prober = threading.Thread(target=probe, daemon=True)
        prober.start()
        try:
            results = asyncio.run(main())
        finally:
            stop.set()
            prober.join(10)
        for kind, held_s, answer in results:
            limit = body_timeout if kind == "body" else header_timeout
            assert held_s < limit + 3, (kind, held_s)
            if kind != "idle":
                assert answer.startswith(b"HTTP/1.1 408"), (kind, answer[:80])
        assert len(health_ms) > 20 and max(health_ms) < 1000, max(health_ms)
        assert metric(client, 'onerec_http_errors_total{code="408"}') == 220
        assert metric(client, 'onerec_http_responses_total{code="408",route="connection"}') == 20  # headers
        assert client.post("/v1/recommend", json=BODY).status_code == 200


def test_connection_and_in_flight_caps_answer_503_with_retry_after(checkpoint):
    gate = threading.Event()

    def loader(cfg):
        served = load_served_model(cfg.model_uri, "cpu")
        real = served.search

        def search(sids, mask, profile, beam, k):
            if beam == 5:
                assert gate.wait(30)
            return real(sids, mask, profile, beam, k)

        served.search = search
        return served

    app = create_app(config(checkpoint, max_in_flight=1, max_connections=8), loader=loader)
    with serve_in_thread(app) as (url, _), httpx.Client(base_url=url, timeout=30) as client:
        wait_ready(client, url)
        slow = threading.Thread(target=lambda: client.post("/v1/recommend", json={**BODY, "beam": 5}), daemon=True)
        slow.start()
        wait_for(lambda: metric(client, "onerec_in_flight_requests") == 1)
        with httpx.Client(base_url=url, timeout=30) as other:
            r = other.post("/v1/recommend", json=BODY)
            assert r.status_code == 503 and r.headers["retry-after"] == "1" and "in flight" in r.json()["error"]
            assert other.get("/v2/health/ready").status_code == 200  # readiness: the model's state, not the load
        gate.set()
        slow.join(30)
        assert client.post("/v1/recommend", json=BODY).status_code == 200

        port = int(url.rsplit(":", 1)[1])
        held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(12)]
        try:
            refused = 0
            for sock in held:
                sock.settimeout(0.5)
                try:
                    data = sock.recv(4096)
                except TimeoutError:
                    continue
                if data:
                    assert data.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in data
                    refused += 1
            assert refused >= 12 - 8 + 1  # client's own keep-alive connection counts too
            assert metric(client, 'onerec_http_responses_total{code="503",route="connection"}') == refused
            assert metric(client, 'onerec_http_responses_total{code="503",route="/v1/recommend"}') == 1
        finally:
            for sock in held:
                sock.close()
        wait_for(lambda: client.get("/v2/health/ready").status_code == 200)


def test_a_client_disconnect_is_one_debug_line(checkpoint, caplog):
    app = create_app(config(checkpoint))
    uvicorn_log = logging.getLogger("uvicorn")  # does not propagate to the root logger caplog watches
    uvicorn_log.addHandler(caplog.handler)
    try:
        with serve_in_thread(app) as (url, _), httpx.Client(base_url=url, timeout=30) as client:
            wait_ready(client, url)
            caplog.clear()
            caplog.set_level(logging.DEBUG, logger="onerec.serve.guard")
            port = int(url.rsplit(":", 1)[1])
            for _ in range(5):
                with socket.create_connection(("127.0.0.1", port)) as sock:
                    sock.sendall(http_request("POST", "/v1/recommend", b"{" * 100)[:-50])  # half the body, gone
            wait_for(lambda: sum("disconnected" in r.getMessage() for r in caplog.records) == 5)
            assert client.get("/v2/health/ready").status_code == 200
            assert metric(client, 'onerec_http_errors_total{code="499"}') == 5
    finally:
        uvicorn_log.removeHandler(caplog.handler)
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING]


# -- the loader's refusals -------------------------------------------------------------------------


def altered(checkpoint, tmp_path, name="bad"):
    folder = tmp_path / name
    shutil.copytree(checkpoint, folder)
    return folder


@pytest.mark.parametrize("entry", ["../../../../etc/hostname", "/etc/passwd", "./config.json", "a/../config.json"])
def test_manifest_entries_outside_the_folder_are_refused(checkpoint, tmp_path, entry):
    folder = altered(checkpoint, tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest[entry] = {"sha256": "0" * 64, "bytes": 1}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="not a relative path inside the folder"):
        load_served_model(str(folder), "cpu")
    with pytest.raises(UserError, match="not a relative path inside the folder"):
        load_checkpoint(folder)


def test_symlinks_in_a_model_folder_are_refused(checkpoint, tmp_path):
    folder = altered(checkpoint, tmp_path)  # listed weights replaced by a link to identical bytes
    (folder / "model.safetensors").unlink()
    os.symlink(checkpoint / "model.safetensors", folder / "model.safetensors")
    with pytest.raises(UserError, match="model.safetensors is a symbolic link"):
        load_served_model(str(folder), "cpu")

    folder = altered(checkpoint, tmp_path, "linked-dir")  # an unlisted linked folder
    os.symlink("/etc", folder / "extra")
    with pytest.raises(UserError, match="extra is a symbolic link"):
        load_served_model(str(folder), "cpu")


def test_a_manifest_listing_a_missing_file_names_it(checkpoint, tmp_path):
    folder = altered(checkpoint, tmp_path)
    (folder / "semantic_ids.npy").unlink()
    with pytest.raises(UserError, match="semantic_ids.npy is listed in the manifest but missing"):
        load_served_model(str(folder), "cpu")


@pytest.mark.parametrize("field,value", [
    ("n_layers", 1_000_000), ("d_model", 10**9), ("n_heads", 0), ("codebook_size", 2**40),
    ("context_len", 10**12), ("ffn_hidden", -1), ("n_layers", "12"), ("n_layers", 2.5),
])
def test_configs_beyond_sane_bounds_fail_fast(checkpoint, tmp_path, field, value):
    folder = altered(checkpoint, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg[field] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    write_manifest(folder)
    start = time.perf_counter()
    with pytest.raises(UserError, match=f"invalid config.*{field}"):
        load_served_model(str(folder), "cpu")
    assert time.perf_counter() - start < 5
