"""`onerec-fp8 gate latency`: FP8 vs bf16 latency and throughput of the engine on the current GPU.

Runs `onerec.engine.Engine` on the checkpoint's own shapes (its config's context length, the
serving beam size) for the bf16 checkpoint and for the quantized folder, on the same GPU, the
same random requests, and compares p50 latency at the smallest batch and throughput at the
largest. Without FP8 tensor cores (no CUDA GPU, or compute capability below 8.9) it returns
`measurable: false` with the reason and no number at all: the pipeline's config decides whether
that blocks.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
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
    batch_sizes: tuple[int, ...] = (1, 8)
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


def measure_latency(
    checkpoint_dir: str | Path, quantized_dir: str | Path, config: LatencyGateConfig | None = None,
) -> dict:
    """bf16 vs FP8 engine latencies on this GPU -> dict with measurable, passed, latencies, ratios."""
    config = config or LatencyGateConfig()
    result: dict = {"gate": "latency", "thresholds": dataclasses.asdict(config),
                    "checkpoint": str(checkpoint_dir), "quantized": str(quantized_dir)}
    ok, why = fp8_support()
    if not ok:
        log.warning("latency gate not measurable: %s", why)
        return {**result, "measurable": False, "reason": why, "passed": None}

    import torch

    from onerec.checkpoint import load_checkpoint
    from onerec.engine.benchmark import percentile, random_requests, time_calls
    from onerec.engine.engine import Engine, EngineConfig
    from onerec.quant.export import load_quantized
    from onerec.semantic_ids import SemanticIdIndex

    device = torch.device("cuda")
    model, table = load_checkpoint(checkpoint_dir, device=device, dtype=torch.bfloat16)
    qmodel, qtable, recipe = load_quantized(quantized_dir, device=device)
    if table.shape != qtable.shape or (table != qtable).any():
        raise UserError(f"{quantized_dir} was not made from {checkpoint_dir}: their semantic-id tables differ")
    cfg = model.cfg
    index = SemanticIdIndex.build(table, cfg.codebook_size).to(device)
    engine_config = EngineConfig(beam_size=config.beam_size, k=config.k)
    engines = {"bf16": Engine(model, index, engine_config), "fp8": Engine(qmodel, index, engine_config)}
    context_len = config.context_len or cfg.context_len
    latencies: dict = {"bf16": {}, "fp8": {}}
    for batch in config.batch_sizes:
        sids, mask = random_requests(cfg, batch, context_len, table[(table >= 0).all(1)], config.seed + batch, device)
        for name, engine in engines.items():
            times = time_calls(lambda engine=engine, sids=sids, mask=mask: engine.recommend(sids, mask),
                               config.warmup, config.repeats)
            latencies[name][batch] = {"p50_ms": percentile(times, 0.5), "p99_ms": percentile(times, 0.99),
                                      "requests_per_s": batch / (percentile(times, 0.5) / 1e3)}
            log.info("%s batch %d: p50 %.2f ms", name, batch, latencies[name][batch]["p50_ms"])
    small, large = min(config.batch_sizes), max(config.batch_sizes)
    latency_ratio = latencies["fp8"][small]["p50_ms"] / latencies["bf16"][small]["p50_ms"]
    throughput_ratio = latencies["fp8"][large]["requests_per_s"] / latencies["bf16"][large]["requests_per_s"]
    passed = latency_ratio <= config.max_latency_ratio and throughput_ratio >= config.min_throughput_ratio
    return {
        **result, "measurable": True, "device": why, "torch": torch.__version__, "cuda": torch.version.cuda,
        "context_len": context_len, "recipe": recipe.get("recipe", recipe.get("name")),
        "fp8_engine_layers": engines["fp8"].fp8,
        "latency_ms": latencies, "latency_batch": small, "throughput_batch": large,
        "latency_ratio": latency_ratio, "throughput_ratio": throughput_ratio, "passed": bool(passed),
    }


def plot(result: dict, path: str | Path) -> Path:
    """PNG for the reviewer: p50 latency and requests/s per batch, bf16 vs FP8, with the thresholds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not result.get("measurable"):
        fig, ax = plt.subplots(figsize=(7, 2))
        ax.axis("off")
        ax.text(0.5, 0.5, f"latency gate not measurable:\n{result.get('reason', '?')}", ha="center", va="center")
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
    fig.suptitle(f"latency gate {verdict} on {result.get('device', '?')}", color="green" if result["passed"] else "red")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="bf16 checkpoint folder")
    parser.add_argument("--quantized", required=True, help="quantized folder made from it")
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
    config = LatencyGateConfig(
        max_latency_ratio=args.max_latency_ratio, min_throughput_ratio=args.min_throughput_ratio,
        batch_sizes=tuple(int(b) for b in args.batch_sizes.split(",") if b), beam_size=args.beam_size,
        context_len=args.context_len, repeats=args.repeats,
    )
    result = measure_latency(args.checkpoint, args.quantized, config)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    if args.report_dir:
        report = Path(args.report_dir)
        report.mkdir(parents=True, exist_ok=True)
        (report / "latency_gate.json").write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
        result["plot"] = str(plot(result, report / "latency_gate.png"))
    return result
