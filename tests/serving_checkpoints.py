"""Helpers for the serving tests: random tiny checkpoints and in-process servers on free loopback ports."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import numpy as np
import torch

from onerec.checkpoint import save_checkpoint
from onerec.model import OneRecV2, OneRecV2Config
from ops.processes import free_port

PROFILE_FEATURES = ["age", "activity"]
PROFILE_MEAN = [30.0, 2.0]


def random_tiny_checkpoint(out: Path, seed: int = 0, num_items: int = 300, profile: bool = True) -> Path:
    """A `tiny` checkpoint with random weights and a random semantic-id table (some ids unknown)."""
    torch.manual_seed(seed)
    cfg = OneRecV2Config.from_preset("tiny", profile_features=PROFILE_FEATURES if profile else [])
    model = OneRecV2(cfg)
    if profile:
        model.context.profile_mean.copy_(torch.tensor(PROFILE_MEAN))
        model.context.profile_std.copy_(torch.tensor([10.0, 1.0]))
    rng = np.random.default_rng(seed)
    c = cfg.codebook_size
    codes = rng.choice(c**3, size=num_items, replace=False)
    table = np.stack([codes // (c * c), (codes // c) % c, codes % c], 1).astype(np.int32)
    table[rng.choice(num_items, num_items // 15, replace=False)] = -1  # gaps in the id range
    return save_checkpoint(model, table, out)


@contextlib.contextmanager
def serve_in_thread(app, timeout_s: float = 60):
    """Run `app` under uvicorn in a thread on a free loopback port, with the server's own limits
    (onerec.serve.server.uvicorn_config); yields (base url, uvicorn server)."""
    import uvicorn

    from onerec.serve.server import uvicorn_config

    port = free_port()
    server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", port, log_level="warning"))
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout_s
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"test server on port {port} did not start")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def wait_ready(client, url: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if client.get(url + "/v2/health/ready").status_code == 200:
            return
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready after {timeout_s} s")
