"""GPU serving benchmark: `onerec-fp8 serve` over HTTP next to the engine alone, same GPU, same run.

    PYTHONPATH=. python3 bench/gpu_serving_bench.py --bf16 CKPT --fp8 QUANTIZED --out OUT_DIR

For each model (a bf16 checkpoint and its FP8 artifact) and each history mix (bench/load.py's
`short`: 10..60 items, `mixed`: log-uniform 1..3000):
1. the engine alone, in this process: the served model loaded as the server loads it
   (onerec.serve.model_store.load_served_model with the same shapes), every graph captured, then
   requests/s at each batch bucket on histories of the mix (4 input sets rotated, CUDA-synchronised
   wall time of 10 batches after 3 warm-ups);
2. the server: `onerec-fp8 serve` started on a loopback port (time to ready measured from the
   process start), then bench/load.py at each concurrency level; each level records the server's
   mean users per batch, its eager fallbacks and captures after ready, and history padding.
Each served level is set beside the engine's throughput at the batch bucket the server ran, so the
ratio is read side by side. Targets (docs/serving.md) are checked and written with the numbers:
one JSON (device, versions, date, command) and one PNG in --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
import load  # noqa: E402  (bench/load.py)

TARGETS = {"served_over_engine_fp8_best": 0.80, "fp8_over_bf16_at_32_plus": 1.25, "p99_over_p50": 2.0,
           "time_to_ready_s": 120.0}


def say(message: str) -> None:
    print(f"[serving-bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def mix_histories(mix: str, n: int, known: np.ndarray, rng: np.random.Generator) -> list[list[int]]:
    args = SimpleNamespace(history_mix=mix, history_len=50)
    return [rng.choice(known, size=load.history_length(args, rng)).tolist() for _ in range(n)]


def engine_sweep(folder: Path, args, mixes: list[str]) -> dict:
    """Requests/s of the served model's engine alone at each batch bucket, per mix: the search the
    server's batch runs, on the tensors it gets (inputs encoded as the server encodes them)."""
    import torch

    from onerec.semantic_ids import pad_histories
    from onerec.serve.app import encode_user, prepare_user
    from onerec.serve.model_store import ServingShapes, load_served_model

    shapes = ServingShapes(beam_widths=(args.beam,), max_batch_users=args.max_batch_size)
    t0 = time.perf_counter()
    served = load_served_model(str(folder), args.device, shapes=shapes)
    loaded_s = time.perf_counter() - t0
    prepared = served.prepare()
    say(f"engine {served.kind}: loaded in {loaded_s:.1f} s, {prepared}")
    known = np.flatnonzero((served.table >= 0).all(1))
    rng = np.random.default_rng(args.seed)
    engine = served.engine
    sync = torch.cuda.synchronize if served.device.startswith("cuda") else (lambda: None)
    out = {"kind": served.kind, "backend": served.backend, "load_s": round(loaded_s, 2), "capture": prepared,
           "mixes": {}}
    for mix in mixes:
        rows = {}
        for batch in shapes.batch_buckets():
            if batch not in args.engine_batches:
                continue
            sets = []
            for _ in range(4):
                users = [encode_user(served, prepare_user(served, h, None)) for h in mix_histories(mix, batch, known, rng)]
                sids, mask = pad_histories([u.codes for u in users], served.table.shape[1])
                profile = None if users[0].profile is None else torch.from_numpy(np.stack([u.profile for u in users]))
                sets.append((sids, mask, profile))
            before = dict(engine.positions) if engine is not None else {}
            for i in range(args.engine_warmup):
                served.search(*sets[i % 4], args.beam, 10)
            sync()
            t = time.perf_counter()
            for i in range(args.engine_repeats):
                served.search(*sets[i % 4], args.beam, 10)
            sync()
            seconds = (time.perf_counter() - t) / args.engine_repeats
            row = {"ms_per_batch": round(seconds * 1000, 3), "requests_per_s": round(batch / seconds, 1)}
            if engine is not None:
                real = engine.positions["real"] - before["real"]
                padding = engine.positions["padding"] - before["padding"]
                row["padding_share"] = round(padding / max(real + padding, 1), 3)
            rows[str(batch)] = row
            say(f"engine {served.kind} {mix} batch {batch}: {row}")
        out["mixes"][mix] = rows
    if engine is not None:
        out["eager_fallbacks"] = engine.eager_fallbacks
        out["captures_after_ready"] = engine.captures_after_ready
    del served, engine
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


def serve_and_load(folder: Path, args, mixes: list[str], out_dir: Path, kind: str) -> dict:
    server_args = [f"--device={args.device}", f"--max-batch-size={args.max_batch_size}", f"--beam-widths={args.beam}",
                   f"--max-beam={args.beam}", f"--default-beam={args.beam}", f"--max-wait-ms={args.max_wait_ms}",
                   "--max-in-flight=1024"]
    t0 = time.perf_counter()
    proc, url = load.start_server(str(folder), server_args, timeout_s=600)
    ready_s = time.perf_counter() - t0
    import httpx

    meta = httpx.get(url + "/v2/models/onerec-v2-fp8", timeout=10).json().get("parameters", {})
    say(f"server {kind}: ready after {ready_s:.1f} s (graphs {meta.get('cuda_graphs')})")
    result = {"time_to_ready_s": round(ready_s, 1), "startup_seconds_reported": meta.get("startup_seconds"),
              "cuda_graphs": meta.get("cuda_graphs"), "history_buckets": meta.get("history_buckets"),
              "batch_buckets": meta.get("batch_buckets"), "server_args": server_args, "mixes": {}}
    try:
        for mix in mixes:
            report = load.main([
                "--url", url, "--server-pid", str(proc.pid), "--concurrency", args.concurrency,
                "--duration", str(args.duration), "--requests", "1000000", "--warmup", "20", "--beam", str(args.beam),
                "--k", "10", "--history-mix", mix, "--items-from", str(folder),
                "--out", str(out_dir / f"load_{kind}_{mix}.json"), "--note", f"{kind} {folder}",
            ])
            result["mixes"][mix] = report["levels"]
            result["versions"] = report["versions"]
    finally:
        load.stop_server(proc)
    return result


def bucket_of(batch: float, buckets: list[int]) -> int:
    return next((b for b in buckets if b >= math.ceil(batch)), buckets[-1])


def compare(engines: dict, served: dict, mixes: list[str], buckets: list[int]) -> tuple[dict, dict]:
    rows, checks = {}, {}
    for mix in mixes:
        for kind in ("bf16", "fp8"):
            eng = engines[kind]["mixes"][mix]
            for level in served[kind]["mixes"][mix]:
                mean_batch = level.get("mean_users_per_batch") or 1
                b = str(bucket_of(mean_batch, [x for x in buckets if str(x) in eng]))
                engine_rps = eng[b]["requests_per_s"]
                rows.setdefault(mix, {}).setdefault(str(level["concurrency"]), {})[kind] = {
                    "served_rps": level["requests_per_s"], "p50_ms": level["latency_ms"]["p50"],
                    "p99_ms": level["latency_ms"]["p99"], "mean_users_per_batch": level.get("mean_users_per_batch"),
                    "engine_batch": int(b), "engine_rps": engine_rps,
                    "served_over_engine": round(level["requests_per_s"] / engine_rps, 3), "engine": level.get("engine"),
                    "batch_busy_share": level.get("batch_busy_share"), "errors": level["errors"],
                }
        levels = rows[mix]
        best = max(levels.values(), key=lambda r: r["fp8"]["served_rps"])["fp8"]
        checks[f"{mix}: served FP8 at its best level / engine FP8 at that batch"] = {
            "value": best["served_over_engine"], "target": f">= {TARGETS['served_over_engine_fp8_best']}",
            "ok": best["served_over_engine"] >= TARGETS["served_over_engine_fp8_best"]}
        for c, r in levels.items():
            if int(c) >= 32:
                ratio = round(r["fp8"]["served_rps"] / r["bf16"]["served_rps"], 3)
                r["fp8_over_bf16_served"] = ratio
                checks[f"{mix}: served FP8 / bf16 at concurrency {c}"] = {
                    "value": ratio, "target": f">= {TARGETS['fp8_over_bf16_at_32_plus']}",
                    "ok": ratio >= TARGETS["fp8_over_bf16_at_32_plus"]}
        worst = max((r[k]["p99_ms"] / r[k]["p50_ms"], f"{k} at {c}") for c, r in levels.items() for k in ("bf16", "fp8"))
        checks[f"{mix}: worst p99 / p50"] = {"value": round(worst[0], 2), "where": worst[1],
                                             "target": f"<= {TARGETS['p99_over_p50']}", "ok": worst[0] <= TARGETS["p99_over_p50"]}
        captures = sum((r[k]["engine"] or {}).get("captures_after_ready", 0) for r in levels.values() for k in ("bf16", "fp8"))
        eager = sum((r[k]["engine"] or {}).get("eager_fallbacks", 0) for r in levels.values() for k in ("bf16", "fp8"))
        checks[f"{mix}: captures after ready"] = {"value": captures, "target": "0", "ok": captures == 0}
        checks[f"{mix}: eager fallbacks"] = {"value": eager, "target": "0 (shapes outside the captured set)",
                                             "ok": eager == 0}
    for kind in ("bf16", "fp8"):
        t = served[kind]["time_to_ready_s"]
        checks[f"{kind}: time to ready (s)"] = {"value": t, "target": f"<= {TARGETS['time_to_ready_s']}",
                                                "ok": t <= TARGETS["time_to_ready_s"]}
    return rows, checks


def plot(rows: dict, title: str, path: Path) -> None:
    from onerec.plots import pyplot

    plt = pyplot()
    mixes = list(rows)
    fig, axes = plt.subplots(2, len(mixes), figsize=(6.5 * len(mixes), 8), squeeze=False)
    for j, mix in enumerate(mixes):
        levels = sorted(rows[mix], key=int)
        xs = [int(c) for c in levels]
        ax = axes[0][j]
        for kind, color in (("bf16", "tab:blue"), ("fp8", "tab:red")):
            ax.plot(xs, [rows[mix][c][kind]["served_rps"] for c in levels], "o-", color=color, label=f"{kind} served")
            ax.plot(xs, [rows[mix][c][kind]["engine_rps"] for c in levels], "x--", color=color,
                    label=f"{kind} engine at the served batch")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency (closed-loop clients)")
        ax.set_ylabel("requests/s")
        ax.set_title(f"{mix} histories: throughput")
        ax.legend(fontsize=8)
        ax = axes[1][j]
        for kind, color in (("bf16", "tab:blue"), ("fp8", "tab:red")):
            ax.plot(xs, [rows[mix][c][kind]["p50_ms"] for c in levels], "o-", color=color, label=f"{kind} p50")
            ax.plot(xs, [rows[mix][c][kind]["p99_ms"] for c in levels], "s:", color=color, label=f"{kind} p99")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("concurrency")
        ax.set_ylabel("latency (ms)")
        ax.set_title(f"{mix} histories: latency")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bf16", type=Path, required=True, help="bf16 checkpoint folder")
    parser.add_argument("--fp8", type=Path, required=True, help="its FP8 artifact folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--concurrency", default="1,8,32,64,128")
    parser.add_argument("--mixes", default="short,mixed")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per load level")
    parser.add_argument("--beam", type=int, default=512)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-wait-ms", type=float, default=0.0)
    parser.add_argument("--engine-batches", default="1,2,4,8,16,32,64")
    parser.add_argument("--device", default="cuda", help="cpu: a plumbing smoke run (tiny models), no numbers")
    parser.add_argument("--engine-warmup", type=int, default=3)
    parser.add_argument("--engine-repeats", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    args.engine_batches = {int(b) for b in args.engine_batches.split(",")}
    mixes = args.mixes.split(",")
    for mix in mixes:
        if mix not in load.HISTORY_MIXES:
            raise SystemExit(f"--mixes: unknown mix {mix!r}; known: {', '.join(load.HISTORY_MIXES)}")
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU (--device cpu: a plumbing smoke run)")
    args.out.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    folders = {"bf16": args.bf16, "fp8": args.fp8}
    engines = {kind: engine_sweep(folder, args, mixes) for kind, folder in folders.items()}
    served = {kind: serve_and_load(folder, args, mixes, args.out, kind) for kind, folder in folders.items()}
    from onerec.serve.model_store import ServingShapes

    buckets = list(ServingShapes(max_batch_users=args.max_batch_size).batch_buckets())
    rows, checks = compare(engines, served, mixes, buckets)
    from onerec.engine.latency_gate import environment

    report = {
        "benchmark": "served vs engine throughput (bench/gpu_serving_bench.py)", "date": started,
        **environment(torch.device(args.device)), "platform": platform.platform(),
        "command": " ".join(["python3", *sys.argv]), "targets": TARGETS,
        "settings": {"beam": args.beam, "k": 10, "max_batch_size": args.max_batch_size, "max_wait_ms": args.max_wait_ms,
                     "concurrency": args.concurrency, "duration_s": args.duration, "users_per_request": 1,
                     "mixes": {"short": "uniform 10..60 items", "mixed": "log-uniform 1..3000 items"}},
        "engine": engines, "served": served, "side_by_side": rows, "checks": checks,
        "ok": all(c["ok"] for c in checks.values()),
    }
    device = report["device"].replace(" ", "_").lower()
    path = args.out / f"serving_{device}{'_' + args.tag if args.tag else ''}.json"
    path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    plot(rows, f"onerec-fp8 serve vs engine, {report['device']}, beam {args.beam}, {started}", path.with_suffix(".png"))
    say(f"wrote {path}")
    for name, check in checks.items():
        say(f"{'ok  ' if check['ok'] else 'MISS'} {name}: {check['value']} (target {check['target']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
