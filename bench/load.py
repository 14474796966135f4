"""Load test of a running `onerec-fp8 serve`: requests/s and p50/p99 latency at given concurrencies.

    .venv/bin/python bench/load.py --url http://127.0.0.1:8080 --concurrency 1,4,16 --out bench/results/load.json
    .venv/bin/python bench/load.py --serve-model path/to/folder --concurrency 1,4,16 --out ...

Loopback only: the target must be 127.0.0.0/8, localhost or ::1 (this is a load generator).
Every level is bounded in count (--requests) and time (--duration). With --serve-model the
script starts the server itself on a free loopback port and stops it at the end. Histories are
drawn from the model's known items when the folder is at hand (--serve-model or --items-from),
else uniformly from [0, --max-item-id) (unknown ids are dropped by the server, as in production).
Writes a JSON report (device, versions, date, command) and a PNG of latency and throughput.
The server's resident memory is sampled every second when its process is known (--serve-model,
or --server-pid): a soak is one long level, e.g. `--concurrency 64 --duration 60 --requests 10000000`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import ipaddress
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np

from ops.processes import free_port


def check_loopback(url: str) -> None:
    host = urlsplit(url).hostname or ""
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise SystemExit(f"bench/load.py only targets loopback addresses, not {host!r}")


def start_server(model: str, server_args: list[str], timeout_s: float = 180) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "onerec_fp8.cli", "serve", "--model-uri", model, "--port", str(port), *server_args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited (code {proc.returncode}) before it was ready: {shlex.join(cmd)}")
        try:
            if httpx.get(url + "/v2/health/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop_server(proc)
    raise SystemExit(f"the server was not ready after {timeout_s} s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


# history-length mixes (--history-mix): "short" uniform in 10..60 items; "mixed" log-uniform in
# 1..3000 (most histories short, a long tail up to the 1b context: real feeds look like this)
HISTORY_MIXES = ("short", "mixed")


def history_length(args, rng: np.random.Generator) -> int:
    if args.history_mix == "short":
        return int(rng.integers(10, 61))
    if args.history_mix == "mixed":
        return int(min(3000, np.exp(rng.uniform(0, np.log(3001)))))
    return int(rng.integers(max(1, args.history_len // 2), args.history_len + 1))


def make_bodies(n: int, args, known: np.ndarray | None, rng: np.random.Generator) -> list[bytes]:
    bodies = []
    for _ in range(n):
        users = []
        for _ in range(args.users_per_request):
            length = history_length(args, rng)
            ids = rng.choice(known, size=length) if known is not None else rng.integers(0, args.max_item_id, size=length)
            users.append({"history": [int(i) for i in ids]})
        bodies.append(json.dumps({"users": users, "k": args.k, "beam": args.beam}).encode())
    return bodies


def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    import psutil

    return round(psutil.Process(pid).memory_info().rss / 2**20, 1)


class Connection:
    """One keep-alive HTTP/1.1 connection that POSTs and reads a Content-Length framed answer.

    The load generator's own cost must stay far below the server's: an httpx AsyncClient with 64
    and more pooled connections spent more time per request than the server did (one process on a
    16-core H200 host, 2026-12-04: the server saw 2 users per batch at concurrency 128), so the
    levels run on plain asyncio streams; the timeout bounds every request.
    """

    def __init__(self, host: str, port: int, timeout_s: float):
        self.host, self.port, self.timeout_s = host, port, timeout_s
        self.reader = self.writer = None

    async def post(self, path: str, body: bytes) -> str:
        """The status code as a string, or the error's name (the connection is then reopened)."""
        try:
            return await asyncio.wait_for(self._post(path, body), self.timeout_s)
        except (OSError, asyncio.IncompleteReadError, ValueError, TimeoutError) as exc:
            self.close()
            return type(exc).__name__

    async def _post(self, path: str, body: bytes) -> str:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(f"POST {path} HTTP/1.1\r\nhost: {self.host}\r\ncontent-type: application/json\r\n"
                          f"content-length: {len(body)}\r\n\r\n".encode() + body)
        status = (await self.reader.readline()).split()
        if len(status) < 2:
            raise ValueError("no status line")
        length, close = 0, False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "connection" and value.strip().lower() == "close":
                close = True
        await self.reader.readexactly(length)
        if close:
            self.close()
        return status[1].decode()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def run_level(
    url: str, bodies: list[bytes], concurrency: int, max_requests: int, duration_s: float, pid: int | None = None,
) -> dict:
    latencies: list[float] = []
    finished: list[float] = []
    errors: dict[str, int] = {}
    sent = 0
    start = time.perf_counter()
    deadline = start + duration_s
    target = urlsplit(url)
    connections = [Connection(target.hostname, target.port or 80, timeout_s=60) for _ in range(concurrency)]

    async def worker(conn: Connection):
        nonlocal sent
        while sent < max_requests and time.perf_counter() < deadline:
            body = bodies[sent % len(bodies)]
            sent += 1
            t0 = time.perf_counter()
            code = await conn.post("/v1/recommend", body)
            t1 = time.perf_counter()
            if code == "200":
                latencies.append(t1 - t0)
                finished.append(t1 - start)
            else:
                errors[code] = errors.get(code, 0) + 1
        conn.close()

    rss: list[tuple[float, float]] = []

    async def sample_rss():
        while True:
            rss.append((round(time.perf_counter() - start, 2), rss_mb(pid)))
            await asyncio.sleep(1.0)

    sampler = asyncio.create_task(sample_rss()) if pid is not None else None
    await asyncio.gather(*(worker(c) for c in connections))
    if sampler is not None:
        sampler.cancel()
        rss.append((round(time.perf_counter() - start, 2), rss_mb(pid)))
    elapsed = time.perf_counter() - start
    lat_ms = np.asarray(latencies) * 1000
    pct = (lambda q: round(float(np.percentile(lat_ms, q)), 3)) if len(lat_ms) else (lambda q: None)
    return {
        "concurrency": concurrency, "requests": sent, "ok": len(latencies), "errors": errors,
        "duration_s": round(elapsed, 3), "requests_per_s": round(len(latencies) / elapsed, 2),
        "latency_ms": {"p50": pct(50), "p90": pct(90), "p99": pct(99), "max": pct(100),
                       "mean": round(float(lat_ms.mean()), 3) if len(lat_ms) else None},
        "http_5xx": sum(n for code, n in errors.items() if code.startswith("5")),
        "server_rss_mb": {"start": rss[0][1], "mid": rss[len(rss) // 2][1], "end": rss[-1][1],
                          "max": max(r for _, r in rss)} if rss else None,
        "_latencies_ms": lat_ms.tolist(),
        "_rss": rss,
    }


def engine_counters(url: str) -> dict:
    """The server's engine counters (onerec.serve.app.EngineCollector): eager fallbacks, graph
    captures after ready, history positions real and padding; its recommend latency sum and count;
    the batch thread's busy seconds; full garbage collections and their pauses."""
    text = httpx.get(url + "/metrics", timeout=10).text
    out = {}
    for line in text.splitlines():
        for key, name in (("onerec_eager_fallbacks_total", "eager_fallbacks"),
                          ("onerec_graph_captures_after_ready_total", "captures_after_ready"),
                          ('onerec_history_positions_total{kind="real"}', "real_positions"),
                          ('onerec_history_positions_total{kind="padding"}', "padding_positions"),
                          ('onerec_request_duration_seconds_sum{route="/v1/recommend"}', "server_seconds"),
                          ('onerec_request_duration_seconds_count{route="/v1/recommend"}', "server_requests"),
                          ("onerec_batch_seconds_sum", "batch_seconds"),
                          ('onerec_gc_pause_seconds_sum{generation="2"}', "gc_full_pause_seconds"),
                          ('onerec_gc_pause_seconds_count{generation="2"}', "gc_full_collections")):
            if line.startswith(key + " "):
                out[name] = float(line.split()[-1])
    return out


def batch_stats(url: str) -> tuple[float, float]:
    """(sum, count) of the server's batch-size histogram: users per beam search."""
    text = httpx.get(url + "/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        for key in ("onerec_batch_size_users_sum", "onerec_batch_size_users_count"):
            if line.startswith(key + " "):
                values[key] = float(line.split()[-1])
    return values.get("onerec_batch_size_users_sum", 0.0), values.get("onerec_batch_size_users_count", 0.0)


def environment() -> dict:
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for pkg in ("torch", "onerec-fp8", "fastapi", "uvicorn", "httptools", "httpx", "numpy"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name"))
    return {"versions": versions, "host": {"cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform()}}


def plot(levels: list[dict], title: str, out: Path) -> None:
    from onerec.plots import pyplot

    plt = pyplot()

    with_rss = any(lv["_rss"] for lv in levels)
    fig, axes = plt.subplots(1, 3 if with_rss else 2, figsize=(16 if with_rss else 11, 4))
    ax1, ax2 = axes[:2]
    for level in levels:
        if level["_latencies_ms"]:
            ax1.hist(level["_latencies_ms"], bins=40, alpha=0.5, label=f"concurrency {level['concurrency']}")
    ax1.set_xlabel("latency (ms)")
    ax1.set_ylabel("requests")
    ax1.set_title("latency distribution")
    ax1.legend()
    xs = [lv["concurrency"] for lv in levels]
    ax2.plot(xs, [lv["requests_per_s"] for lv in levels], "o-", color="tab:blue", label="requests/s")
    ax2.set_xlabel("concurrency")
    ax2.set_ylabel("requests/s", color="tab:blue")
    ax2.set_xscale("log", base=2)
    twin = ax2.twinx()
    twin.plot(xs, [lv["latency_ms"]["p50"] for lv in levels], "s--", color="tab:orange", label="p50")
    twin.plot(xs, [lv["latency_ms"]["p99"] for lv in levels], "^--", color="tab:red", label="p99")
    twin.set_ylabel("latency (ms)")
    twin.legend(loc="upper left")
    ax2.set_title("throughput and latency vs concurrency")
    if with_rss:
        for level in levels:
            if level["_rss"]:
                t, mb = zip(*level["_rss"], strict=True)
                axes[2].plot(t, mb, label=f"concurrency {level['concurrency']}")
        axes[2].set_xlabel("seconds into the level")
        axes[2].set_ylabel("server RSS (MiB)")
        axes[2].set_title("server resident memory")
        axes[2].legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running server (loopback)")
    target.add_argument("--serve-model", help="start `onerec-fp8 serve` on this model for the run")
    parser.add_argument("--server-pid", type=int, help="with --url: the server's process, for its memory")
    parser.add_argument("--server-arg", action="append", default=[], help="extra serve flag (repeatable), e.g. --server-arg=--device=cpu")
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated levels")
    parser.add_argument("--requests", type=int, default=400, help="most requests per level")
    parser.add_argument("--duration", type=float, default=20.0, help="most seconds per level")
    parser.add_argument("--warmup", type=int, default=10, help="requests before measuring")
    parser.add_argument("--users-per-request", type=int, default=1)
    parser.add_argument("--history-len", type=int, default=50, help="histories of len/2..len items")
    parser.add_argument("--history-mix", choices=HISTORY_MIXES, default=None,
                        help="instead of --history-len: short (10..60) or mixed (log-uniform 1..3000)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--beam", type=int, default=128)
    parser.add_argument("--items-from", help="model folder whose known item ids make the histories")
    parser.add_argument("--max-item-id", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="JSON report (a PNG is written beside it)")
    parser.add_argument("--note", default="", help="free text kept in the report (e.g. how the model was made)")
    args = parser.parse_args(argv)
    levels_wanted = [int(c) for c in args.concurrency.split(",")]
    if min(levels_wanted) < 1 or args.requests < 1 or args.duration <= 0:
        raise SystemExit("concurrency, --requests and --duration must be positive")

    proc = None
    if args.serve_model:
        proc, url = start_server(args.serve_model, args.server_arg)
        pid = proc.pid
    else:
        url = args.url.rstrip("/")
        pid = args.server_pid
    check_loopback(url)
    try:
        folder = args.items_from or args.serve_model
        known = None
        if folder and (Path(folder) / "semantic_ids.npy").is_file():
            table = np.load(Path(folder) / "semantic_ids.npy", allow_pickle=False)
            known = np.flatnonzero((table >= 0).all(1))
        rng = np.random.default_rng(args.seed)
        bodies = make_bodies(256, args, known, rng)
        name = httpx.get(url + "/v2/models/" + os.environ.get("ONEREC_MODEL_NAME", "onerec-v2-fp8"), timeout=10)
        metadata = name.json() if name.status_code == 200 else {}
        asyncio.run(run_level(url, bodies, 1, args.warmup, 60))
        levels = []
        for concurrency in levels_wanted:
            s0, c0 = batch_stats(url)
            e0 = engine_counters(url)
            level = asyncio.run(run_level(url, bodies, concurrency, args.requests, args.duration, pid))
            s1, c1 = batch_stats(url)
            e1 = engine_counters(url)
            level["mean_users_per_batch"] = round((s1 - s0) / (c1 - c0), 2) if c1 > c0 else None
            level["engine"] = {k: e1[k] - e0.get(k, 0) for k in e1}
            served = level["engine"].pop("server_requests", 0)
            # the server's own time per request (its latency histogram): the client's latency minus
            # this is spent in the network stack and the load generator
            level["server_mean_ms"] = round(level["engine"].pop("server_seconds", 0) / served * 1000, 3) if served else None
            # the share of the level's wall time the batch thread spent in batches: below 1 under
            # load, the GPU waited for the host between batches
            level["batch_busy_share"] = round(level["engine"].pop("batch_seconds", 0) / level["duration_s"], 3)
            levels.append(level)
            print(f"concurrency {concurrency}: {level['requests_per_s']} req/s, p50 {level['latency_ms']['p50']} ms, "
                  f"p99 {level['latency_ms']['p99']} ms, errors {level['errors']}, server RSS {level['server_rss_mb']}",
                  file=sys.stderr)
    finally:
        if proc is not None:
            stop_server(proc)
    params = metadata.get("parameters", {})
    report = {
        "benchmark": "serving load (bench/load.py)",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, "bench/load.py", *(argv if argv is not None else sys.argv[1:])]),
        "device": {"serving": params.get("device"), "backend": params.get("backend"), **environment()["host"]},
        "versions": environment()["versions"],
        "model": {"name": metadata.get("name"), "versions": metadata.get("versions"), "kind": params.get("kind"),
                  "digest": params.get("digest"), "context_len": params.get("context_len")},
        "workload": {"users_per_request": args.users_per_request, "history_len": args.history_len,
                     "history_mix": args.history_mix, "k": args.k,
                     "beam": args.beam, "requests_per_level": args.requests, "max_seconds_per_level": args.duration},
        "server_args": args.server_arg,
        "note": args.note,
        "levels": [{k: v for k, v in lv.items() if not k.startswith("_")} for lv in levels],
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        title = f"{report['model']['kind']} {report['model']['name']} on {report['device']['serving']} ({report['device']['cpu']}), {report['date']}"
        plot(levels, title, args.out.with_suffix(".png"))
    return report


if __name__ == "__main__":
    print(json.dumps(main()["levels"]))
