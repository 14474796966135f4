"""GPU check of the daily job's GPU part, run exactly as the requantize DAG's Kubernetes pods run it.

    python3 bench/gpu_pipeline_check.py --out bench/results 2>&1 | tee out/pipeline_check.log

On a machine with an FP8 GPU (H100/H200), no network needed:
1. `onerec-fp8 data synth --users 10000 --items 10000 --interactions-per-user 24` (users.parquet:
   profile features);
2. `onerec-fp8 train --preset 1b --epochs 1 --device cuda`, written where the fetch step puts the
   checkpoint (<state>/pipeline/<id>/checkpoint/), and a calibration table of 2 x --quality-users
   users, one request each (the user's newest training request, history long enough for
   --quality-positions positions), at <state>/pipeline/<id>/calibration.parquet: the quantize
   step holds out half the users, so the quality gate scores --quality-users users x
   --quality-positions positions; the fetch step's result (tasks.requantize.Fetched) describes them;
3. quantize, quality_gate, latency_gate: each one `onerec-fp8 pipeline exec STEP --inputs JSON
   --xcom-file F` in a subprocess, the inputs being the earlier steps' results by step name as the
   DAG renders them from XCom (tasks.requantize.STEPS[...].inputs), ONEREC_STATE_DIR set as in the
   pod, ONEREC_QUALITY_EVAL_REQUESTS = --quality-users, ONEREC_QUALITY_GATE positions =
   --quality-positions, ONEREC_LAYER_CHOICE = --layer-choice ("timed": quantize keeps in bf16 the
   layers whose FP8 GEMM is slower on this GPU at one user); timed, results read back from F;
4. bench/gpu_bench.py --variants bf16-engine,fp8-engine on the latency gate's shapes (each measured
   batch at its history length, the trained table's item count; `--fp8-layers timed` with
   --layer-choice timed), to compare the FP8/bf16 ratios.
Checks: every step exited 0 (a pod succeeds once its step ran; the verdict is in the XCom), the quality gate ran on CUDA on
--quality-users users x --quality-positions positions, the latency gate measured on CUDA and gave a verdict, the ratios agree
with bench within 10%, the GPU part within 5 minutes. One JSON (device, versions, date, command,
per-step seconds, both gate results, the bench comparison) goes to --out. Progress on stderr.
Without `onerec-fp8` on PATH (a bare torch machine) the same arguments run through
`python -m onerec_fp8.cli`. A second run with the same --work reuses the data and checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # onerec, tasks: run from a checkout, nothing installed
from onerec.gate_verdict import GateVerdict  # noqa: E402
from tasks.config import PipelineConfig, config_json  # noqa: E402
from tasks.requantize import pod_arguments  # noqa: E402

GPU_STEPS = ("quantize", "quality_gate", "latency_gate")
GPU_PART_TARGET_S = 300.0
RATIO_TOLERANCE = 0.10


def say(message: str) -> None:
    print(f"[pipeline-check {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def entry_point() -> list[str]:
    """How `onerec-fp8` is invoked here: the installed script, else the same CLI module."""
    script = shutil.which("onerec-fp8")
    return [script] if script else [sys.executable, "-m", "onerec_fp8.cli"]



class Budget:
    def __init__(self, seconds: float):
        self.t0, self.seconds = time.monotonic(), seconds

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.t0)


def run(argv: list[str], env: dict, budget: Budget, what: str) -> tuple[int, str, float]:
    """Run a command (stderr streams through), returns (exit code, stdout, seconds)."""
    timeout = max(budget.left(), 1.0)
    say(f"{what}: {' '.join(a if len(a) < 200 else a[:80] + '...' for a in argv)}")
    t0 = time.monotonic()
    try:
        proc = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=None, text=True, timeout=timeout)
        code, out = proc.returncode, proc.stdout
    except subprocess.TimeoutExpired:
        code, out = 124, ""
    seconds = time.monotonic() - t0
    say(f"{what}: exit {code} in {seconds:.1f} s")
    return code, out, seconds


def last_json(stdout: str) -> dict | None:
    """The result JSON a command printed last: the whole of stdout, else its last JSON line."""
    try:
        return json.loads(stdout)
    except json.JSONDecodeError:
        pass
    for line in reversed(stdout.strip().splitlines()):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    return None


def versions() -> dict:
    import torch

    from onerec.engine.latency_gate import environment

    return environment(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def make_work_folder(args, cli: list[str], env: dict, budget: Budget, timings: dict) -> dict:
    """Synthetic data, a trained 1b checkpoint and a calibration table laid out as the fetch step
    leaves them; returns the fetch step's result."""
    from onerec.data import calibration_requests, load_dataset, split_leave_last_out
    from onerec.errors import UserError
    from onerec.manifest import manifest_digest, sha256_file, verify_manifest
    from onerec.model import OneRecV2Config
    from tasks.requantize import Fetched

    data = args.work / f"data-{args.users}u-{args.items}i-{args.interactions_per_user}ipu"
    work = args.state / "pipeline" / args.checkpoint_id
    checkpoint = work / "checkpoint"
    if not (data / "interactions.parquet").is_file():
        code, _, timings["synth_s"] = run(
            [*cli, "data", "synth", "--out", str(data), "--users", str(args.users), "--items", str(args.items),
             "--interactions-per-user", str(args.interactions_per_user), "--overwrite"], env, budget, "synth")
        if code:
            raise SystemExit(f"data synth failed (exit {code})")
    try:
        verify_manifest(checkpoint)
        trained = True
        say(f"reusing the trained checkpoint {checkpoint}")
    except UserError:
        trained = False
    if not trained:
        code, _, timings["train_s"] = run(
            [*cli, "train", "--data", str(data), "--preset", args.preset, "--epochs", "1", "--device", args.device,
             "--batch-size", str(args.train_batch_size), "--out", str(checkpoint), "--overwrite"], env, budget, "train")
        if code:
            raise SystemExit(f"train failed (exit {code})")
    calibration = work / "calibration.parquet"
    context_len = OneRecV2Config.load(checkpoint / "config.json").context_len
    split = split_leave_last_out(load_dataset(data), max_history=context_len)
    newest = split.train.groupby("user_id").tail(1)  # one request per user: the gate's unit is the user
    newest = newest[newest["history"].map(len) >= args.quality_positions + 1]  # every position then scores
    requests = calibration_requests(dataclasses.replace(split, train=newest), n=2 * args.quality_users)
    if len(requests) < 2 * args.quality_users:
        raise SystemExit(f"only {len(requests)} users with {args.quality_positions + 2} interactions or more; "
                         f"need {2 * args.quality_users} (raise --users or --interactions-per-user)")
    requests.to_parquet(calibration, index=False)
    fetched = Fetched(
        checkpoint_id=args.checkpoint_id, checkpoint_uri=f"s3://onerec/onerec-v2/checkpoints/{args.checkpoint_id}/",
        checkpoint_dir=str(checkpoint), checkpoint_sha256=manifest_digest(checkpoint),
        calibration_uri="s3://onerec/onerec-v2/calibration/check/calibration.parquet",
        calibration_path=str(calibration), calibration_sha256=sha256_file(calibration),
        work_dir=str(work), report_dir=str(work / "reports"),
    )
    shutil.rmtree(work / f"quantized-{args.recipe}", ignore_errors=True)  # quantize for real, every run
    return dataclasses.asdict(fetched)


def bench_comparison(latency: dict, num_items: int, env: dict, budget: Budget, out: Path,
                     layer_choice: str = "all") -> dict:
    """The GPU benchmark (bench/gpu_bench.py: bf16 vs FP8 engine, random weights, unpadded histories) at
    each batch the latency gate measured, with that batch's history length and the trained table's size."""
    cfg = latency["thresholds"]
    bench = [sys.executable, str(REPO / "bench" / "gpu_bench.py")]
    rows = {}
    for batch in latency["measured_batch_sizes"]:
        b = str(batch)
        T = latency["shapes"][b]["history_len"]
        if budget.left() < 60:
            rows[b] = {"skipped": "time budget"}
            continue
        argv = [*bench, "--presets", latency["preset"], "--batches", b, "--variants", "bf16-engine,fp8-engine",
                "--context-len", str(T), "--beam-size", str(cfg["beam_size"]), "--k", str(cfg["k"]),
                "--num-items", str(num_items), "--warmup", str(cfg["warmup"]), "--repeats", str(cfg["repeats"]),
                "--fp8-layers", layer_choice, "--out", str(out), "--tag", f"pipeline_check_b{b}"]
        code, stdout, seconds = run(argv, env, budget, f"bench batch {b}")
        summary = last_json(stdout) or {}
        if code or not summary.get("results"):
            rows[b] = {"error": f"exit {code}", "command": " ".join(["python3", *argv[1:]])}
            continue
        result = json.loads(Path(summary["results"][0]).read_text())
        runs = {r["variant"]: r for r in result["runs"]}
        gate = latency["latency_ms"]
        row = {"history_len": T, "seconds": round(seconds, 1), "command": " ".join(["python3", *argv[1:]]),
               "bench_p50_ms": {v: runs[v]["p50_ms"] for v in runs},
               "gate_p50_ms": {v: gate[v][b]["p50_ms"] for v in ("bf16", "fp8")}}
        if {"bf16-engine", "fp8-engine"} <= set(runs):
            bench_ratio = runs["fp8-engine"]["p50_ms"] / runs["bf16-engine"]["p50_ms"]
            gate_ratio = gate["fp8"][b]["p50_ms"] / gate["bf16"][b]["p50_ms"]
            row.update(bench_fp8_over_bf16_p50=bench_ratio, gate_fp8_over_bf16_p50=gate_ratio,
                       relative_difference=gate_ratio / bench_ratio - 1,
                       within_tolerance=abs(gate_ratio / bench_ratio - 1) <= RATIO_TOLERANCE)
        rows[b] = row
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="folder of the result JSON")
    parser.add_argument("--work", type=Path, default=REPO / "out" / "pipeline_check",
                        help="scratch: data, state dir (the pods' ONEREC_STATE_DIR), bench outputs")
    parser.add_argument("--preset", default="1b")
    parser.add_argument("--users", type=int, default=10000)
    parser.add_argument("--interactions-per-user", type=int, default=24, help="mean, of the synthetic data")
    parser.add_argument("--items", type=int, default=10000)
    parser.add_argument("--train-batch-size", type=int, default=256)
    parser.add_argument("--quality-users", type=int, default=4096, help="held-out users the quality gate scores")
    parser.add_argument("--quality-positions", type=int, default=10, help="held-out positions per user it scores")
    parser.add_argument("--recipe", default="fp8_dynamic")
    parser.add_argument("--layer-choice", default="all", choices=["all", "timed"],
                        help="ONEREC_LAYER_CHOICE of the quantize pod (fp8_dynamic): timed = FP8 only where it "
                             "measured faster on this GPU at one user")
    parser.add_argument("--checkpoint-id", default="check")
    parser.add_argument("--latency-gate", default=None,
                        help='ONEREC_LATENCY_GATE for the pod, e.g. \'{"batch_sizes": [1, 8]}\' (default: the config\'s)')
    parser.add_argument("--time-budget", type=float, default=540.0, help="seconds for everything; bench is skipped first")
    parser.add_argument("--tag", default="", help="suffix of the result file name")
    parser.add_argument("--device", default="cuda", help="cpu: a plumbing smoke test only (no latency measured)")
    args = parser.parse_args()
    args.work = args.work.resolve()
    budget = Budget(args.time_budget)
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        say("no CUDA GPU: this check needs one (--device cpu: a plumbing smoke test)")
        return 2
    from tasks.requantize import STEP

    cli = entry_point()
    # one state dir per model and data: a later run reuses exactly what it would have made
    args.state = args.work / f"state-{args.preset}-{args.users}u-{args.items}i-{args.interactions_per_user}ipu"
    args.state.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "ONEREC_STATE_DIR": str(args.state), "ONEREC_RECIPE": args.recipe,
           "ONEREC_QUALITY_EVAL_REQUESTS": str(args.quality_users), "ONEREC_LAYER_CHOICE": args.layer_choice,
           "ONEREC_QUALITY_GATE": json.dumps({"positions": args.quality_positions}),
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    if args.latency_gate:
        env["ONEREC_LATENCY_GATE"] = args.latency_gate
    timings: dict = {}
    fetched = make_work_folder(args, cli, env, budget, timings)
    results: dict = {"fetch": fetched}
    steps: dict = {}
    xcom_dir = args.work / "xcom"
    xcom_dir.mkdir(exist_ok=True)
    config = config_json(PipelineConfig.from_env(env))  # the worker's configuration, as the DAG gives it to a pod
    for step in GPU_STEPS:
        inputs = json.dumps({name: results[name] for name in STEP[step].inputs})  # the DAG's `| tojson` XComs
        xcom = xcom_dir / f"{step}.json"
        xcom.unlink(missing_ok=True)
        (xcom_dir / f"{step}.inputs.json").write_text(inputs)  # to re-run one step by hand
        code, stdout, seconds = run([*cli, *pod_arguments(step, inputs, config, str(xcom))], env, budget, step)
        result = json.loads(xcom.read_text()) if xcom.is_file() else None
        steps[step] = {"exit_code": code, "seconds": round(seconds, 2), "xcom_written": result is not None,
                       "command": " ".join(["onerec-fp8", *pod_arguments(step, "JSON", "CONFIG", "F")])}
        if result is None:
            say(f"{step} wrote no result (exit {code}); stopping")
            break
        results[step] = result
    # each pod returns its gate's verdict; this check reads the full reports the verdicts name
    quality, latency = (json.loads(Path(GateVerdict.from_dict(results[s]).report_json).read_text())
                        if results.get(s) else None for s in ("quality_gate", "latency_gate"))
    chosen = {}  # the timed per-layer choice of the quantized folder (recipe.json), when made
    if results.get("quantize"):
        recipe_json = json.loads((Path(results["quantize"]["quantized_dir"]) / "recipe.json").read_text())
        chosen = recipe_json.get("layer_choice", {})

    checks = {"every_step_ran": all(s["exit_code"] == 0 and s["xcom_written"] for s in steps.values())
              and len(steps) == len(GPU_STEPS)}
    if quality:
        checks["quality_gate_on_cuda"] = str(quality.get("config", {}).get("device", "")).startswith("cuda")
        checks["quality_gate_users"] = quality.get("num_users") == args.quality_users
        checks["quality_gate_positions"] = quality.get("num_positions") == args.quality_users * args.quality_positions
        checks["quality_gate_verdict"] = isinstance(quality.get("passed"), bool)
    if latency:
        checks["latency_gate_measured_on_cuda"] = latency.get("measurable") is True and latency.get("timed_on") == "cuda"
        checks["latency_gate_verdict"] = isinstance(latency.get("passed"), bool)
        checks["latency_gate_requests_from_table"] = latency.get("requests", {}).get("source") == "table"
    gpu_part_s = sum(s["seconds"] for s in steps.values())
    checks["gpu_part_within_5_min"] = gpu_part_s <= GPU_PART_TARGET_S

    comparison = {}
    if latency and latency.get("measurable") and latency.get("measured_batch_sizes"):
        import numpy as np

        latency["preset"] = args.preset
        num_items = len(np.load(Path(fetched["checkpoint_dir"]) / "semantic_ids.npy"))
        comparison = bench_comparison(latency, num_items, env, budget, args.work / "bench", args.layer_choice)
        latency.pop("preset")
        compared = [r["within_tolerance"] for r in comparison.values() if "within_tolerance" in r]
        # None: not run (the time budget skips the bench first); it neither passes nor fails the check
        checks["ratios_agree_with_bench_within_10pct"] = all(compared) if compared else None

    report = {
        "date": started, **versions(), "platform": platform.platform(),
        "command": " ".join(["python3", *sys.argv]), "pythonpath": os.environ.get("PYTHONPATH"),
        "entry_point": " ".join(cli[-3:]),
        "settings": {"preset": args.preset, "users": args.users, "items": args.items, "recipe": args.recipe,
                     "layer_choice": args.layer_choice,
                     "quality_users": args.quality_users, "quality_positions": args.quality_positions,
                     "interactions_per_user": args.interactions_per_user, "latency_gate": args.latency_gate,
                     "time_budget_s": args.time_budget},
        "seconds": {**{k: round(v, 1) for k, v in timings.items()}, **{s: v["seconds"] for s, v in steps.items()},
                    "gpu_part": round(gpu_part_s, 1), "total": round(time.monotonic() - budget.t0, 1)},
        "gpu_part_target_s": GPU_PART_TARGET_S,
        "steps": steps, "quantize": results.get("quantize"), "layer_choice": chosen,
        "quality_gate": quality, "latency_gate": latency,
        "bench_comparison": comparison, "ratio_tolerance": RATIO_TOLERANCE,
        "checks": checks, "not_run": [name for name, ok in checks.items() if ok is None],
        "ok": all(ok for ok in checks.values() if ok is not None),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    device = report["device"].replace(" ", "_").lower()
    path = args.out / f"pipeline_check_{device}{'_' + args.tag if args.tag else ''}.json"
    path.write_text(json.dumps(report, indent=1, sort_keys=True, default=str) + "\n")
    say(f"wrote {path}")
    say("seconds: " + ", ".join(f"{k} {v}" for k, v in report["seconds"].items()))
    if quality:
        say(f"quality gate: {quality.get('verdict')} on {quality.get('config', {}).get('device')}, "
            f"{quality.get('num_users')} users x {quality.get('positions')} positions in {quality.get('seconds')} s, "
            f"top-10 overlap {quality.get('top10_overlap')}")
    if latency:
        say(f"latency gate: measurable={latency.get('measurable')} passed={latency.get('passed')} "
            f"latency ratio {latency.get('latency_ratio')} throughput ratio {latency.get('throughput_ratio')}")
    if chosen:
        say(f"timed layer choice on {chosen['device']} at {chosen['rows']} rows: bf16 for "
            f"{sorted(n for n, e in chosen['layers'].items() if e['choice'] == 'bf16')}")
    say(f"checks: {checks}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
