"""The serving proxy and the approval relay bound what they read, as the inference server does:
each runs as its real process (uvicorn) on loopback, with its limits lowered so a test takes seconds."""

from __future__ import annotations

import contextlib
import http.server
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from ops.processes import free_port

TOKEN = "t" * 32
SMALL = {"header_timeout_s": 1.0, "max_header_bytes": 4096, "max_connections": 8, "keep_alive_s": 5.0}


@contextlib.contextmanager
def server(module: str, argv: list[str], health: str, **constants):
    """`python -m module` with LIMITS lowered to SMALL and the module constants `constants` set."""
    code = (f"import sys, {module} as m; m.LIMITS.update({SMALL!r}); "
            + "".join(f"m.{k} = {v!r}; " for k, v in constants.items()) + f"sys.exit(m.main({argv!r}))")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True)
    port = argv[argv.index("--port") + 1]
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + health, timeout=2, trust_env=False).status_code == 200:
                    break
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def proxy(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    os.chmod(token_file, 0o600)
    argv = ["--port", str(free_port()), "--state-file", str(tmp_path / "upstream.json"), "--token-file", str(token_file)]
    with server("ops.rollout.proxy", argv, "/_proxy/status", MAX_BODY=64 << 10, MAX_RESPONSE=256 << 10,
                BODY_TIMEOUT_S=1.0, MAX_IN_FLIGHT=2) as (url, proc):
        yield url, proc


@pytest.fixture
def relay(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("s" * 40)
    os.chmod(secret, 0o600)
    argv = ["--port", str(free_port()), "--secret-file", str(secret), "--state-dir", str(tmp_path)]
    with server("ops.approval_relay", argv, "/health", BODY_TIMEOUT_S=1.0) as (url, proc):
        yield url, proc


def switch(proxy_url: str, upstream: str) -> None:
    reply = httpx.put(proxy_url + "/_proxy/upstream", json={"url": upstream}, trust_env=False,
                      headers={"Authorization": f"Bearer {TOKEN}"})
    assert reply.status_code == 200, reply.text


def raw(url: str, data: bytes, wait_s: float = 10.0) -> bytes:
    """Send `data` on a new connection, return what comes back until the server closes (or `wait_s`)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait_s) as sock:
        sock.sendall(data)
        received = b""
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while chunk := sock.recv(65536):
                received += chunk
    return received


def check_common_limits(url: str, path: str) -> None:
    """Content-Length over the limit: 413 before any body byte; headers and body must come in time;
    beyond the connection cap a new connection is answered 503 and closed."""
    t0 = time.monotonic()
    head = f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {400 << 20}\r\n\r\n"
    answer = raw(url, head.encode() + b"{", wait_s=5)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert time.monotonic() - t0 < 4  # answered without waiting for the 400 MiB

    t0 = time.monotonic()
    assert raw(url, f"POST {path} HTTP/1.1\r\nhost: x\r\n".encode(), wait_s=10).startswith(b"HTTP/1.1 408")
    assert time.monotonic() - t0 < 5  # the header timeout (1 s here) closed it
    body_started = f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{{".encode()
    assert raw(url, body_started, wait_s=10).startswith(b"HTTP/1.1 408")

    host, port = url.removeprefix("http://").split(":")
    held = [socket.create_connection((host, int(port)), timeout=5) for _ in range(SMALL["max_connections"])]
    try:
        time.sleep(0.2)
        assert raw(url, b"", wait_s=5).startswith(b"HTTP/1.1 503")
    finally:
        for sock in held:
            sock.close()


def test_proxy_bounds_headers_bodies_and_connections(proxy):
    url, _ = proxy
    check_common_limits(url, "/v1/recommend")
    # a chunked body (no Content-Length) is cut off at the cap while it streams in
    chunk = b"x" * 8192
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(16)) + b"0\r\n\r\n"
    head = b"POST /v1/recommend HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
    assert raw(url, head + chunks, wait_s=5).startswith(b"HTTP/1.1 413")
    admin = f"PUT /_proxy/upstream HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {TOKEN}\r\ncontent-length: 100000\r\n\r\n"
    assert raw(url, admin.encode(), wait_s=5).startswith(b"HTTP/1.1 413")


def test_proxy_caps_requests_in_flight_and_upstream_answers(proxy):
    url, _ = proxy
    # an upstream that accepts connections and never answers: two requests wait on it
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    switch(url, f"http://127.0.0.1:{silent.getsockname()[1]}")
    waiting = [threading.Thread(target=raw, args=(url, b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n", 3))
               for _ in range(2)]
    for thread in waiting:
        thread.start()
    time.sleep(1.0)
    busy = httpx.get(url + "/v1/other", timeout=5, trust_env=False)
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
    for thread in waiting:
        thread.join()
    silent.close()  # the two waiting requests fail now and free their slots

    # an upstream answer over the cap is not relayed: 502
    class Big(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("content-length", str(1 << 20))
            self.end_headers()
            self.wfile.write(b"y" * (1 << 20))

        def log_message(self, *args):
            pass

    big = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Big)
    threading.Thread(target=big.serve_forever, daemon=True).start()
    try:
        deadline = time.monotonic() + 30
        while httpx.get(url + "/_proxy/status", timeout=5, trust_env=False).status_code == 503:
            assert time.monotonic() < deadline, "the in-flight slots were never freed"
            time.sleep(0.5)
        switch(url, f"http://127.0.0.1:{big.server_address[1]}")
        reply = httpx.get(url + "/big", timeout=30, trust_env=False)
        assert reply.status_code == 502 and "larger than" in reply.text
    finally:
        big.shutdown()
        big.server_close()


def test_relay_bounds_headers_bodies_and_connections(relay):
    url, _ = relay
    check_common_limits(url, "/mlflow-webhook")


def test_clean_stops_log_no_traceback_and_the_proxy_logs_no_line_per_request(tmp_path, relay):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    os.chmod(token_file, 0o600)
    argv = ["--port", str(free_port()), "--state-file", str(tmp_path / "upstream.json"), "--token-file", str(token_file)]
    with server("ops.rollout.proxy", argv, "/_proxy/status", GRACEFUL_S=1.0) as proxy:
        url = proxy[0]
        switch(url, relay[0])
        for _ in range(5):
            assert httpx.get(url + "/health", timeout=5, trust_env=False).status_code == 200  # through the proxy
        # a request still waiting on a silent upstream when the proxy stops: cancelled after GRACEFUL_S
        silent = socket.socket()
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        switch(url, f"http://127.0.0.1:{silent.getsockname()[1]}")
        waiting = threading.Thread(target=raw, args=(url, b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n", 10))
        waiting.start()
        time.sleep(0.5)
        for name, (_, process) in (("proxy", proxy), ("relay", relay)):
            process.terminate()
            out = process.communicate(timeout=30)[0]
            assert "Traceback" not in out and "CancelledError" not in out, (name, out[-3000:])
            if name == "proxy":
                assert "cancelled at shutdown" in out and "/health" not in out, out[-3000:]
        waiting.join()
        silent.close()
