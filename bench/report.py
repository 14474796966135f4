"""The benchmark's outputs: a markdown table, the results JSON and a latency/throughput plot."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from onerec.plots import pyplot

log = logging.getLogger(__name__)

VARIANTS = ("bf16-eager", "bf16-engine", "fp8-engine", "torchao-fp8")


def markdown_table(result: dict) -> str:
    lines = [
        f"{result['device']}, torch {result['torch']}, CUDA {result['cuda']}, triton {result.get('triton')}, "
        f"peaks bf16 {result['peaks']['bf16_tflops']:.0f} / fp8 {result['peaks']['fp8_tflops']:.0f} TFLOP/s",
        "",
        "| preset | users/batch | variant | p50 ms | p99 ms | req/s | items/s | useful TFLOP/s | MFU bf16 / fp8 peak | peak GiB | top-10 overlap vs bf16 eager |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    presets = list(dict.fromkeys(r["preset"] for r in result["runs"]))
    runs = sorted(result["runs"], key=lambda r: (presets.index(r["preset"]), r["batch"], VARIANTS.index(r["variant"])))
    for r in runs:
        ov, mem = r.get("topk_overlap_vs_bf16_eager"), r.get("peak_memory_gib")
        lines.append(
            f"| {r['preset']} | {r['batch']} | {r['variant']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
            f"{r['requests_per_s']:.1f} | {r['items_per_s']:.0f} | {r['useful_tflops']:.0f} | "
            f"{r['mfu_vs_bf16_peak']:.0%} / {r['mfu_vs_fp8_peak']:.0%} | "
            f"{'' if mem is None else f'{mem:.1f}'} | "
            f"{'' if ov is None else f'{ov:.2f}'} |"
        )
    for preset, s in sorted(result.get("summary", {}).items()):
        parts = [f"{k} {v:.2f}" for k, v in s.items() if v is not None and "vs" in k]
        if parts:
            lines.append(f"\n{preset}: " + ", ".join(parts))
    trained = result.get("trained_checkpoint")
    if trained:
        lines.append(f"\ntrained checkpoint ({trained['model']}; {trained['users']} validation users, "
                     f"{trained['recipe']}): top-{trained['k']} overlap")
        for beam, row in trained["by_beam"].items():
            lines.append(f"  beam {beam}: " + ", ".join(f"{key} {v:.3f}" for key, v in row.items()))
    for s in result.get("skipped", []):
        lines.append(f"\nskipped {s['preset']} b={s['batch']} {s['variant']}: {s['why'][:200]}")
    return "\n".join(lines)


def write_results(result: dict, out: Path, tag: str = "") -> list[Path]:
    """JSON + markdown table + latency/throughput plot; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    stem = "bench_" + result["device"].replace(" ", "_").lower() + (f"_{tag}" if tag else "")
    paths = [out / f"{stem}.json", out / f"{stem}.md", out / f"{stem}.png"]
    paths[0].write_text(json.dumps(result, indent=1, sort_keys=True, default=str) + "\n")
    paths[1].write_text(markdown_table(result) + "\n")
    try:
        plot(result, paths[2])
    except Exception:  # a plot must never lose the numbers
        log.exception("plot failed")
        paths.pop()
    return paths


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    presets = sorted({r["preset"] for r in result["runs"]})
    fig, axes = plt.subplots(len(presets), 2, figsize=(11, 3.6 * len(presets)), squeeze=False)
    for row, preset in zip(axes, presets, strict=True):
        for variant in VARIANTS:
            rs = sorted((r for r in result["runs"] if r["preset"] == preset and r["variant"] == variant),
                        key=lambda r: r["batch"])
            if not rs:
                continue
            b = [r["batch"] for r in rs]
            row[0].plot(b, [r["p50_ms"] for r in rs], marker="o", label=variant)
            row[1].plot(b, [r["requests_per_s"] for r in rs], marker="o", label=variant)
        for ax, title in zip(row, ("p50 latency (ms)", "requests/s"), strict=True):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("users per batch")
            ax.set_title(f"{preset}: {title}")
            ax.grid(alpha=0.3)
        row[0].legend()
    fig.suptitle(f"{result['device']}: context {result['settings']['context_len']}, beam {result['settings']['beam_size']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
