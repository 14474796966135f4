"""The local object store, measured: moto (in memory) vs s3rver as the stack runs it (ops/s3/).

    .venv/bin/python bench/s3_store.py --mb 512 --out bench/results/s3_store_cpu.json

For each server, on a free loopback port: upload and download of one model-sized random file with
the pipeline's own transfer settings (tasks.checkpoints: 64 MiB multipart parts, 8 in flight),
the server's RSS holding it, then durability: SIGKILL the server while a PUT overwrites that
object, start it again on the same data and check that the object is listed and byte-identical
to the acknowledged version. Bounded (one file, --repeats rounds), loopback only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ops.processes import free_port  # noqa: E402

MB = 1 << 20
KEYS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}


def start(kind: str, port: int, data: Path) -> subprocess.Popen:
    if kind == "moto":
        cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    else:
        cmd = ["node", "--openssl-legacy-provider", str(REPO / "ops" / "s3" / "server.js"), "--directory", str(data),
               "--port", str(port), "--bucket", "onerec", "--access-key-id", "testing"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    client = s3(port)
    deadline = time.monotonic() + 60
    while True:
        try:
            client.list_buckets()
            break
        except Exception:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"{kind} did not start") from None
            time.sleep(0.2)
    if kind == "moto":
        client.create_bucket(Bucket="onerec")
    return proc


def s3(port: int):
    import boto3

    from tasks.outages import s3_client_config

    return boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", config=s3_client_config(), **KEYS)


def rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / MB


def measure(kind: str, src: Path, tmp: Path, repeats: int) -> dict:
    from tasks.checkpoints import transfer_config

    data = tmp / f"{kind}-data"
    port = free_port()
    proc = start(kind, port, data)
    client = s3(port)
    size_mb = src.stat().st_size / MB
    rounds = []
    try:
        for _ in range(repeats):
            t0 = time.perf_counter()
            client.upload_file(str(src), "onerec", "model/model.safetensors", Config=transfer_config())
            up = time.perf_counter() - t0
            t0 = time.perf_counter()
            client.download_file("onerec", "model/model.safetensors", str(tmp / "out.bin"), Config=transfer_config())
            down = time.perf_counter() - t0
            rounds.append({"upload_s": round(up, 2), "upload_mb_s": round(size_mb / up, 1),
                           "download_s": round(down, 2), "download_mb_s": round(size_mb / down, 1)})
        rss = rss_mb(proc.pid)
        acknowledged = hashlib.sha256(src.read_bytes()).hexdigest()

        # SIGKILL while a PUT overwrites the object, then a restart on the same data
        body = os.urandom(int(min(size_mb, 256)) * MB)
        interrupted = {}

        def overwrite():
            try:
                client.put_object(Bucket="onerec", Key="model/model.safetensors", Body=body)
                interrupted["put"] = "completed before the kill"
            except Exception as exc:
                interrupted["put"] = f"interrupted ({type(exc).__name__})"

        writer = threading.Thread(target=overwrite)
        writer.start()
        time.sleep(0.5)
        proc.kill()
        proc.wait()
        writer.join()
        proc = start(kind, port, data)
        keys = [o["Key"] for o in client.list_objects_v2(Bucket="onerec").get("Contents", [])]
        after = None
        if "model/model.safetensors" in keys:
            after = hashlib.sha256(client.get_object(Bucket="onerec", Key="model/model.safetensors")["Body"].read()).hexdigest()
        new = hashlib.sha256(body).hexdigest()
        survived = after in (acknowledged, new) if interrupted["put"].startswith("completed") else after == acknowledged
        return {"server": kind, "rounds": rounds, "rss_mb_holding_file": round(rss, 1),
                "kill9_during_overwrite": {"put": interrupted["put"], "objects_after_restart": len(keys),
                                           "object_intact": bool(after) and survived}}
    finally:
        proc.kill()
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=512, help="size of the model-sized file (MiB)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--servers", default="moto,s3rver")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="s3bench-"))
    try:
        src = tmp / "model.bin"
        with open(src, "wb") as f:
            for _ in range(args.mb):
                f.write(os.urandom(MB))
        results = [measure(kind, src, tmp, args.repeats) for kind in args.servers.split(",")]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    import boto3
    import moto

    node = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
    lock = json.loads((REPO / "ops" / "s3" / "package-lock.json").read_text())
    report = {
        "what": "local S3 server: throughput with the pipeline's transfer settings, RSS, SIGKILL durability",
        "file_mb": args.mb, "results": results,
        "versions": {"moto": moto.__version__, "boto3": boto3.__version__, "node": node,
                     "s3rver": lock["packages"]["node_modules/s3rver"]["version"]},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "note": "shared 2-core machine, other jobs running: throughput is indicative (+-50%)"},
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
