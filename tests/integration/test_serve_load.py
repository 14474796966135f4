"""bench/load.py end to end on a tiny model: it starts a server, measures, reports, and stops it;
and a soak: 64 concurrent clients for 60 s, no 5xx, bounded server memory."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from serving_checkpoints import random_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def load_module():
    spec = importlib.util.spec_from_file_location("bench_load", ROOT / "bench" / "load.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_load_script_reports_throughput_and_latency(tmp_path):
    bench = load_module()
    model = random_tiny_checkpoint(tmp_path / "ckpt", seed=2)
    out = tmp_path / "load.json"
    report = bench.main([
        "--serve-model", str(model), "--server-arg=--device=cpu", "--server-arg=--threads=1", "--server-arg=--max-wait-ms=20",
        "--concurrency", "1,4", "--requests", "24", "--duration", "30", "--warmup", "2",
        "--history-len", "20", "--beam", "16", "--k", "5", "--out", str(out),
    ])
    assert json.loads(out.read_text()) == report
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert report["device"]["serving"] == "cpu" and report["versions"]["torch"]
    assert report["model"]["kind"] == "bf16" and report["command"].startswith("python")
    for level in report["levels"]:
        assert level["ok"] == level["requests"] == 24 and level["errors"] == {}
        lat = level["latency_ms"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        assert level["requests_per_s"] > 0
    # four callers at once share beam searches
    assert report["levels"][1]["mean_users_per_batch"] > 1


def test_load_script_refuses_non_loopback_targets():
    bench = load_module()
    bench.check_loopback("http://127.0.0.1:8080")
    bench.check_loopback("http://[::1]:8080")
    for url in ("http://10.0.0.5:8080", "http://example.com", "http://192.168.1.2"):
        with pytest.raises(SystemExit, match="loopback"):
            bench.check_loopback(url)


# Growth of the server's resident memory allowed over the soak, after warm-up: the first batches
# at full concurrency allocate larger buffers once (allocator caches); a leak of even 1 KiB per
# request (>= 100 requests/s here) would pass 6 MiB a minute, so the second half is held tighter.
SOAK_RSS_GROWTH_MB = 120
SOAK_RSS_GROWTH_SECOND_HALF_MB = 40


# The local serving proxy in front (the local rollout target's endpoint) may grow this much: it
# buffers at most one request and one answer per connection.
SOAK_PROXY_RSS_GROWTH_MB = 40


@pytest.mark.soak
def test_soak_64_clients_for_60_s_through_the_proxy_without_5xx_and_with_bounded_memory(tmp_path):
    """The server behind the local rollout target's proxy, as a deployed champion serves."""
    import httpx
    import psutil

    from onerec.settings import Settings
    from ops.processes import free_port
    from ops.rollout import local

    bench = load_module()
    model = random_tiny_checkpoint(tmp_path / "ckpt", seed=3)
    settings = Settings(state_dir=str(tmp_path / "state"), local_serve_port=free_port())
    deployed = local.deploy(settings, str(model), "1", device="cpu", threads=1)
    try:
        proxy = psutil.Process(httpx.get(deployed["url"] + "/_proxy/status", timeout=10).json()["pid"])
        proxy_rss = [proxy.memory_info().rss / 2**20]
        report = bench.main([
            "--url", deployed["url"], "--server-pid", str(deployed["pid"]),
            "--concurrency", "64", "--duration", "60", "--requests", "10000000", "--warmup", "10",
            "--history-len", "20", "--beam", "16", "--k", "5", "--out", str(tmp_path / "soak.json"),
        ])
        proxy_rss.append(proxy.memory_info().rss / 2**20)
    finally:
        local.stop(state_dir=tmp_path / "state")
    level = report["levels"][0]
    assert level["errors"] == {} and level["http_5xx"] == 0, level["errors"]
    assert level["duration_s"] >= 59 and level["ok"] > 300, level  # served throughout, even on a busy host
    rss = level["server_rss_mb"]
    assert rss["end"] - rss["start"] < SOAK_RSS_GROWTH_MB, rss
    assert rss["end"] - rss["mid"] < SOAK_RSS_GROWTH_SECOND_HALF_MB, rss
    assert proxy_rss[1] - proxy_rss[0] < SOAK_PROXY_RSS_GROWTH_MB, proxy_rss
