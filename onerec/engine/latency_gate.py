"""`onerec-fp8 gate latency`: FP8 vs bf16 latency and throughput of the engine on the current GPU.

Runs `onerec.engine.Engine` for the bf16 checkpoint and for the quantized folder made from it, on
the same GPU and the same requests, and compares p50 latency at the smallest batch and throughput
at the largest. It measures what will be served:
- requests come from a request table (the run's held-out calibration requests: real histories and
  profile features), encoded the way the server encodes them (`onerec.semantic_ids.encode_histories`,
  as `onerec.serve.app.run_users` calls it: known items only, the newest context_len kept, left-padded
  to the batch's longest history), drawn seeded and cyclically at each of `batch_sizes`;
- without a table, random full-length histories of known items, with the profile features the
  server fills in for a user who sends none (the model's training means, the unknown bucket for categorical ones).
The report adds achieved TFLOP/s (`flop_count`) and MFU against bf16/FP8 matmul peaks measured in
the same process, the GPU, driver and library versions. An out-of-memory batch size ends the
sweep: the gate decides on the batches measured and reports the largest that fit.
Without FP8 tensor cores (no CUDA GPU, or compute capability below 8.9) it returns
`measurable: false` with the reason and no number at all: the pipeline's config decides whether
that blocks.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import platform
import time
from dataclasses import dataclass
from pathlib import Path

from onerec.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class LatencyGateConfig:
    # FP8 p50 latency at the smallest batch may be at most this multiple of bf16's. At one user
    # the GEMMs are too small for FP8 to gain (H100, 1b: 7.81 vs 7.91 ms, bench/README.md), so the
    # gate asks "not slower", not "faster"...
    max_latency_ratio: float = 1.05
    # ...and the gain where FP8 pays: FP8 requests/s at the largest batch must be at least this
    # multiple of bf16's (H100, 1b, 8 users: 1.26x; 0.1b: 0.96x, which fails, rightly).
    min_throughput_ratio: float = 1.10
    batch_sizes: tuple[int, ...] = (1, 8)  # users per batch the deployment serves
    beam_size: int = 512
    k: int = 10
    context_len: int | None = None  # None: the checkpoint's config.context_len
    warmup: int = 3
    repeats: int = 20
    seed: int = 0


def fp8_support() -> tuple[bool, str]:
    """(True, device name) where FP8 tensor cores exist, else (False, why not)."""
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA GPU is visible"
    major, minor = torch.cuda.get_device_capability()
    name = torch.cuda.get_device_name()
    if (major, minor) < (8, 9):
        return False, f"{name} has compute capability {major}.{minor} < 8.9: no FP8 tensor cores"
    return True, name


def environment(device) -> dict:
    """GPU name, compute capability, driver and torch/CUDA/triton/python versions of this process."""
    import torch

    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "triton": None, "device": "cpu", "compute_capability": None, "driver": None}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device=props.name, compute_capability=f"{props.major}.{props.minor}", driver=_driver_version())
    return env


def _driver_version() -> str | None:
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
        return out.splitlines()[0].strip() or None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def source_of_requests(requests_path: str | Path | None) -> dict:
    """Where the gate's requests come from: the table's path and sha256, or "random"."""
    if requests_path is None:
        return {"source": "random"}
    from onerec.data import read_requests
    from onerec.manifest import sha256_file

    path = Path(requests_path)
    path = path / "calibration.parquet" if path.is_dir() else path
    read_requests(path)  # exists and has the request columns, else a one-line error
    return {"source": "table", "path": str(path), "sha256": sha256_file(path)}


def read_request_table(requests_path: str | Path, profile_features: list[str]):
    """The request table, checked against the model's profile columns, numeric and categorical
    (one-line error on a mismatch)."""
    from onerec.data import REQUEST_COLUMNS, read_requests

    requests = read_requests(requests_path)
    if requests.empty:
        raise UserError(f"request table {requests_path} has no rows")
    columns = [c for c in requests.columns if c not in REQUEST_COLUMNS]
    if sorted(columns) != sorted(profile_features):
        raise UserError(f"request table {requests_path}: profile columns {sorted(columns)} do not match the "
                        f"checkpoint's profile features {sorted(profile_features)}")
    return requests


def make_requests(model, table, batch: int, context_len: int, requests=None, seed: int = 0):
    """(history_sids, history_mask, profile) of `batch` users on the model's device.

    From `requests` (a checked request table): rows drawn in one seeded order, cyclically when the
    table has fewer rows than `batch`, encoded as the server encodes them. Otherwise random
    histories of `context_len` known items and the profile the server fills for a user who sends
    none (the model's training means, the unknown bucket of categorical features).
    """
    import numpy as np
    import torch

    from onerec.data import make_batch
    from onerec.engine.timing import random_requests

    cfg, device = model.cfg, model.token_embedding.weight.device
    if requests is not None:
        order = np.random.default_rng(seed).permutation(len(requests))
        rows = requests.iloc[order[np.arange(batch) % len(requests)]]
        b = make_batch(rows, table, context_len, list(cfg.profile_features), cfg.categorical_features).to(device)
        return b.history_sids, b.history_mask, b.profile
    sids, mask = random_requests(cfg, batch, context_len, table[(table >= 0).all(1)], seed + batch, device)
    profile = None
    if cfg.profile_columns:  # numeric features at their means, categorical ones in the unknown bucket
        fill = torch.cat([model.context.profile_mean.float(),
                          torch.zeros(len(cfg.categorical_features), device=device)])
        profile = fill.expand(batch, -1).contiguous()
    return sids, mask, profile


def time_request(engine, sids, mask, profile, warmup: int, repeats: int) -> list[float]:
    """Milliseconds per `engine.recommend` call: device events on a GPU, the wall clock on CPU."""
    if engine.device.type == "cuda":
        from onerec.engine.timing import time_calls

        return time_calls(lambda: engine.recommend(sids, mask, profile), warmup, repeats)
    for _ in range(warmup):
        engine.recommend(sids, mask, profile)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        engine.recommend(sids, mask, profile)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def measure_latency(
    checkpoint_dir: str | Path, quantized_dir: str | Path, config: LatencyGateConfig | None = None,
    requests_path: str | Path | None = None, *, allow_cpu: bool = False,
) -> dict:
    """bf16 vs FP8 engine latencies on this GPU -> dict with measurable, passed, latencies, ratios.

    `requests_path`: a request table (calibration.parquet format); None: random requests.
    `allow_cpu` is for tests only: without an FP8 GPU the engines are timed on CPU (their torch
    reference path) instead of returning `measurable: false`; no command or config sets it.
    """
    config = config or LatencyGateConfig()
    started = time.monotonic()
    result: dict = {"gate": "latency", "thresholds": dataclasses.asdict(config),
                    "checkpoint": str(checkpoint_dir), "quantized": str(quantized_dir),
                    "batch_sizes": list(config.batch_sizes)}
    ok, why = fp8_support()
    if not ok and not allow_cpu:
        log.warning("latency gate not measurable: %s", why)
        return {**result, "measurable": False, "reason": why, "passed": None,
                "duration_s": round(time.monotonic() - started, 3)}
    if not config.batch_sizes or min(config.batch_sizes) < 1:
        raise UserError(f"latency gate batch sizes must be positive, got {list(config.batch_sizes)}")

    import torch

    from onerec.checkpoint import load_checkpoint
    from onerec.engine.engine import Engine, EngineConfig
    from onerec.engine.timing import flop_count, matmul_peaks, percentile
    from onerec.quant.export import check_made_from, load_quantized
    from onerec.semantic_ids import SemanticIdIndex

    device = torch.device("cuda" if ok else "cpu")
    result["requests"] = source_of_requests(requests_path)
    model, table = load_checkpoint(checkpoint_dir, device=device, dtype=torch.bfloat16)
    qmodel, qtable, recipe = load_quantized(quantized_dir, device=device)
    check_made_from(quantized_dir, recipe, checkpoint_dir, table, qtable)
    cfg = model.cfg
    requests = None if requests_path is None else read_request_table(requests_path, cfg.profile_columns)
    env = environment(device)
    peaks = matmul_peaks(device) if device.type == "cuda" else None
    if peaks:
        log.info("matmul peaks: bf16 %.0f, fp8 %.0f TFLOP/s", peaks["bf16_tflops"], peaks["fp8_tflops"])
    index = SemanticIdIndex.build(table, cfg.codebook_size).to(device)
    engine_config = EngineConfig(beam_size=config.beam_size, k=config.k)
    engines = {"bf16": Engine(model, index, engine_config), "fp8": Engine(qmodel, index, engine_config)}
    context_len = config.context_len or cfg.context_len
    latencies: dict = {"bf16": {}, "fp8": {}}
    shapes: dict = {}
    out_of_memory = None
    for batch in sorted(set(config.batch_sizes)):
        try:
            sids, mask, profile = make_requests(model, table, batch, context_len, requests, config.seed)
            T = mask.shape[1]
            flops = flop_count(cfg, T, engines["bf16"].beams)["total"] * batch
            shapes[batch] = {"history_len": T, "padded": not bool(mask.all()),
                             "mean_known_history": float(mask.sum(1).float().mean()), "flop_per_batch": flops}
            row = {}
            for name, engine in engines.items():
                times = time_request(engine, sids, mask, profile, config.warmup, config.repeats)
                p50 = percentile(times, 0.5)
                tflops = flops / (p50 / 1e3) / 1e12
                row[name] = {"p50_ms": p50, "p99_ms": percentile(times, 0.99),
                             "requests_per_s": batch / (p50 / 1e3), "tflops": tflops,
                             "mfu_vs_bf16_peak": tflops / peaks["bf16_tflops"] if peaks else None,
                             "mfu_vs_fp8_peak": tflops / peaks["fp8_tflops"] if peaks else None}
                log.info("%s batch %d (history %d): p50 %.2f ms, %.1f TFLOP/s", name, batch, T, p50, tflops)
        except torch.cuda.OutOfMemoryError as exc:
            out_of_memory = {"batch": batch, "error": str(exc).splitlines()[0][:300]}
            log.warning("out of memory at batch %d: larger batches are not measured", batch)
            shapes.pop(batch, None)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            break
        for name in engines:
            latencies[name][batch] = row[name]
    measured = sorted(latencies["bf16"])
    result.update({
        **env, "measurable": True, "context_len": context_len,
        "timed_on": "cuda" if device.type == "cuda" else "cpu (test mode: not a production measurement)",
        "recipe": (recipe.get("recipe") or {}).get("name"),
        "fp8_engine_layers": engines["fp8"].fp8, "beams_per_step": engines["bf16"].beams, "peaks": peaks,
        "measured_batch_sizes": measured, "largest_batch_that_fit": max(measured) if measured else None,
        "out_of_memory": out_of_memory, "shapes": shapes, "latency_ms": latencies,
    })
    if not measured:
        result.update(passed=False, reason=f"out of memory at batch {out_of_memory['batch']}, the smallest asked for")
    else:
        small, large = measured[0], measured[-1]
        latency_ratio = latencies["fp8"][small]["p50_ms"] / latencies["bf16"][small]["p50_ms"]
        throughput_ratio = latencies["fp8"][large]["requests_per_s"] / latencies["bf16"][large]["requests_per_s"]
        passed = latency_ratio <= config.max_latency_ratio and throughput_ratio >= config.min_throughput_ratio
        result.update(latency_batch=small, throughput_batch=large, latency_ratio=latency_ratio,
                      throughput_ratio=throughput_ratio, passed=bool(passed))
    result["duration_s"] = round(time.monotonic() - started, 3)
    return result


def plot(result: dict, path: str | Path) -> Path:
    """PNG for the reviewer: p50 latency and requests/s per batch, bf16 vs FP8, with the thresholds."""
    from onerec.plots import pyplot

    plt = pyplot()

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not result.get("measurable") or not result.get("latency_ms", {}).get("bf16"):
        fig, ax = plt.subplots(figsize=(7, 2))
        ax.axis("off")
        state = "not measurable" if not result.get("measurable") else "FAILED"
        ax.text(0.5, 0.5, f"latency gate {state}:\n{result.get('reason', '?')}", ha="center", va="center")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path
    lat = result["latency_ms"]
    batches = sorted(lat["bf16"], key=int)
    x = range(len(batches))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for offset, name, color in ((-0.2, "bf16", "#9e9e9e"), (0.2, "fp8", "#1f77b4")):
        ax1.bar([i + offset for i in x], [lat[name][b]["p50_ms"] for b in batches], 0.4, label=name, color=color)
        ax2.bar([i + offset for i in x], [lat[name][b]["requests_per_s"] for b in batches], 0.4, label=name, color=color)
    for ax, ylabel in ((ax1, "p50 latency (ms)"), (ax2, "requests/s")):
        ax.set_xticks(list(x), [f"{b} users" for b in batches])
        ax.set_ylabel(ylabel)
        ax.legend()
    t = result["thresholds"]
    ax1.set_title(f"FP8/bf16 p50 = {result['latency_ratio']:.2f} (max {t['max_latency_ratio']})")
    ax2.set_title(f"FP8/bf16 throughput = {result['throughput_ratio']:.2f} (min {t['min_throughput_ratio']})")
    verdict = "PASSED" if result["passed"] else "FAILED"
    source = result.get("requests", {})
    requests = source.get("path", source.get("source", "?"))
    oom = result.get("out_of_memory")
    fig.suptitle(f"latency gate {verdict} on {result.get('device', '?')} ({result.get('timed_on', 'cuda')}); "
                 f"requests: {requests}" + (f"; out of memory at {oom['batch']} users" if oom else ""),
                 color="green" if result["passed"] else "red", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="bf16 checkpoint folder")
    parser.add_argument("--quantized", required=True, help="quantized folder made from it")
    parser.add_argument("--requests", default=None,
                        help="request table (calibration.parquet format, or a folder holding one) to time; "
                             "default: random requests")
    defaults = LatencyGateConfig()
    parser.add_argument("--max-latency-ratio", type=float, default=defaults.max_latency_ratio)
    parser.add_argument("--min-throughput-ratio", type=float, default=defaults.min_throughput_ratio)
    parser.add_argument("--batch-sizes", default=",".join(map(str, defaults.batch_sizes)))
    parser.add_argument("--beam-size", type=int, default=defaults.beam_size)
    parser.add_argument("--context-len", type=int, default=None, help="default: the checkpoint's")
    parser.add_argument("--repeats", type=int, default=defaults.repeats)
    parser.add_argument("--out", default=None, help="also write the result JSON here")
    parser.add_argument("--report-dir", default=None, help="write latency_gate.json and latency_gate.png here")


def main(args: argparse.Namespace) -> dict:
    import json

    for path in (args.checkpoint, args.quantized):
        if not Path(path).is_dir():
            raise UserError(f"{path}: no such folder")
    try:
        batch_sizes = tuple(int(b) for b in args.batch_sizes.split(",") if b)
    except ValueError:
        raise UserError(f"--batch-sizes {args.batch_sizes!r}: expected comma-separated integers") from None
    config = LatencyGateConfig(
        max_latency_ratio=args.max_latency_ratio, min_throughput_ratio=args.min_throughput_ratio,
        batch_sizes=batch_sizes, beam_size=args.beam_size,
        context_len=args.context_len, repeats=args.repeats,
    )
    result = measure_latency(args.checkpoint, args.quantized, config, requests_path=args.requests)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    if args.report_dir:
        report = Path(args.report_dir)
        report.mkdir(parents=True, exist_ok=True)
        (report / "latency_gate.json").write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
        result["plot"] = str(plot(result, report / "latency_gate.png"))
    return result
