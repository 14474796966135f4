"""`onerec-fp8 analyze`: per-layer weight/activation distributions and FP8 safety flags.

    onerec-fp8 analyze --checkpoint CKPT --calibration TABLE_OR_DATA_DIR --out DIR [--recipe fp8_dynamic]

For every layer the recipe would quantize (the others are listed with the reason), over the
calibration requests:
- weights and input activations: variance, AbsMax, AbsP99, kurtosis, AbsMax/AbsP99 (the
  statistics of the FP8 paper, arXiv 2603.11486);
- SQNR (dB) of the layer's FP8 output vs its high-precision output on the same inputs;
- the dynamic range per token: the share of non-zero input values that per-token E4M3 scaling
  flushes to zero, and the largest per-token AbsMax / smallest non-zero |x| (dB).

Flags (a layer is FP8-unsafe when any rule fires; thresholds in AnalysisConfig):
- low_sqnr:        SQNR < min_sqnr_db (20 dB). E4M3 has 3 mantissa bits: a healthy layer with
                   both operands in FP8 measures about 28-31 dB; 20 dB means ~10% output error.
- token_underflow: more than max_underflow_fraction (1%) of the non-zero input values lie below
                   their token's AbsMax * 2^-10 / 448, i.e. become 0 in E4M3 with per-token
                   scaling: the token's dynamic range exceeds the ~107 dB (448 / 2^-9) that E4M3
                   holds. Per-channel weight scales cannot repair this (the lost values are
                   inputs), so such a layer needs high precision (or a smoothing transform).
- weight_underflow: more than max_underflow_fraction of the non-zero weights become 0 after
                   the recipe's weight quantization (the same range limit along a channel/block).
The largest per-token range in dB is reported but not used as a flag: one tiny value in a token
makes it huge without harming anything; the underflow share measures what is actually lost.

Writes DIR/analysis.json, DIR/analysis_layers.png (per-layer SQNR and AbsMax bars, flagged
layers in red) and DIR/analysis_histograms.png (|x| histograms of the worst layers).
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from onerec.quant import plots

log = logging.getLogger(__name__)


@dataclass
class AnalysisConfig:
    min_sqnr_db: float = 20.0
    max_underflow_fraction: float = 0.01
    histogram_layers: int = 4  # the worst layers (lowest SQNR) get histograms


def weight_underflow_fraction(weight, fp8_layer) -> float:
    """Share of the non-zero weights that the FP8 layer stores as 0."""
    nonzero = weight != 0
    n = int(nonzero.sum())
    if n == 0:
        return 0.0
    lost = nonzero & (fp8_layer.weight_fp8.float() == 0)
    return int(lost.sum()) / n


def layer_flags(stats: dict, config: AnalysisConfig) -> list[str]:
    flags = []
    sqnr = stats.get("sqnr_db")
    if sqnr is not None and sqnr < config.min_sqnr_db:
        flags.append(f"low_sqnr: {sqnr:.1f} dB < {config.min_sqnr_db:g} dB")
    under = stats["activation"].get("per_token_underflow_fraction", 0.0)
    if under > config.max_underflow_fraction:
        flags.append(
            f"token_underflow: {100 * under:.1f}% of non-zero inputs flush to 0 with per-token E4M3 scaling "
            f"(max per-token range {stats['activation']['max_token_dynamic_range_db']:.0f} dB, E4M3 holds ~107 dB)"
        )
    wunder = stats["weight"]["underflow_fraction"]
    if wunder > config.max_underflow_fraction:
        flags.append(f"weight_underflow: {100 * wunder:.1f}% of non-zero weights flush to 0")
    return flags


def analyze(model, calibration, recipe="fp8_dynamic", config: AnalysisConfig | None = None,
            out_dir: str | Path | None = None) -> dict:
    """The analysis of a high-precision model (left unchanged); writes JSON and plots to `out_dir`."""
    import torch  # heavy: torch

    from onerec.quant.calibrate import measure_sqnr, observe_activations, tensor_stats  # heavy: torch
    from onerec.quant.recipes import HANDLERS, make_recipe, select_layers, static_input_scale  # heavy: torch

    config = config or AnalysisConfig()
    recipe = make_recipe(recipe) if isinstance(recipe, str) else recipe
    model.eval()
    selected, excluded = select_layers(model, recipe)
    observers = observe_activations(model, selected, calibration, desc="analyze: activations")
    handler = HANDLERS[type(recipe)]
    layers, fp8 = {}, {}
    with torch.no_grad():
        for name in selected:
            linear = model.get_submodule(name)
            act = observers[name].stats()
            calib = {}
            if recipe.needs_calibration:
                calib["input_scale"] = static_input_scale(observers[name], recipe)[1]
            fp8[name] = handler(linear, recipe, name, calib)
            weight = {**tensor_stats(linear.weight), "underflow_fraction": weight_underflow_fraction(linear.weight, fp8[name])}
            layers[name] = {"shape": list(linear.weight.shape), "weight": weight, "activation": act}
    for name, value in measure_sqnr(model, fp8, calibration, desc="analyze: sqnr").items():
        layers[name]["sqnr_db"] = value
    flagged = {}
    for name, stats in layers.items():
        stats["flags"] = layer_flags(stats, config)
        if stats["flags"]:
            flagged[name] = stats["flags"]
    measured = {n: s["sqnr_db"] for n, s in layers.items() if s.get("sqnr_db") is not None}
    worst = sorted(measured, key=measured.get)
    result = {
        "recipe": recipe.to_dict(),
        "config": asdict(config),
        "num_layers": len(layers),
        "flagged": flagged,
        "safe": not flagged,
        "worst_layers": worst[: config.histogram_layers],
        "worst_layer_sqnr_db": measured[worst[0]] if worst else None,
        "layers": layers,
        "excluded": excluded,
    }
    if out_dir is not None:
        result.update(_write_outputs(result, model, observers, Path(out_dir), config))
    return result


def _write_outputs(result: dict, model, observers, out_dir: Path, config: AnalysisConfig) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    layers, flagged = result["layers"], set(result["flagged"])
    bars = {
        n: {"sqnr_db": s.get("sqnr_db"), "activation_absmax": s["activation"].get("absmax"),
            "weight_absmax": s["weight"]["absmax"]}
        for n, s in layers.items()
    }
    title = (f"{result['recipe']['name']}: {len(flagged)} of {len(layers)} layers flagged FP8-unsafe"
             + (f" ({', '.join(sorted(flagged))})" if flagged else ""))
    bars_png = plots.layer_bars(bars, out_dir / "analysis_layers.png", title, flagged=flagged,
                                sqnr_threshold_db=config.min_sqnr_db)
    # Histograms: flagged layers first, then the lowest SQNR.
    chosen = [*sorted(flagged), *[n for n in result["worst_layers"] if n not in flagged]][: max(config.histogram_layers, len(flagged))]
    samples = {
        n: {"activation": observers[n].sample.numpy(), "weight": model.get_submodule(n).weight.detach().float().flatten().numpy()}
        for n in chosen
    }
    notes = {n: "; ".join(f.split(":")[0] for f in layers[n]["flags"]) for n in chosen if layers[n]["flags"]}
    hist_png = plots.histograms(samples, out_dir / "analysis_histograms.png",
                                "worst layers: |x| of input activations and weights (log-log)", notes)
    json_path = out_dir / "analysis.json"
    paths = {"report_json": str(json_path), "plots": [str(bars_png), str(hist_png)]}
    json_path.write_text(json.dumps({**result, **paths}, indent=2, sort_keys=True) + "\n")
    return paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder")
    parser.add_argument("--calibration", required=True,
                        help="calibration request table (parquet/csv file or folder) or a data folder to draw one from")
    parser.add_argument("--out", required=True, help="folder for analysis.json and the PNG plots")
    parser.add_argument("--recipe", default="fp8_dynamic", choices=("fp8_dynamic", "fp8_static", "fp8_block"))
    parser.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                        help="leave layers matching this pattern out of the analysis (repeatable)")
    parser.add_argument("--max-requests", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--min-sqnr-db", type=float, default=AnalysisConfig.min_sqnr_db)
    parser.add_argument("--max-underflow-fraction", type=float, default=AnalysisConfig.max_underflow_fraction)


def main(args: argparse.Namespace) -> dict:
    from onerec.checkpoint import load_checkpoint  # heavy: safetensors, torch
    from onerec.quant.calibrate import Calibration  # heavy: torch
    from onerec.quant.recipes import make_recipe  # heavy: torch

    recipe = make_recipe(args.recipe, exclude=args.exclude)
    model, table = load_checkpoint(args.checkpoint)
    calibration = Calibration.from_path(args.calibration, table, context_len=model.cfg.context_len,
                                        batch_size=args.batch_size, max_requests=args.max_requests)
    config = AnalysisConfig(min_sqnr_db=args.min_sqnr_db, max_underflow_fraction=args.max_underflow_fraction)
    result = analyze(model, calibration, recipe, config, args.out)
    # stdout: the verdict and where the details are; the per-layer table is in analysis.json.
    return {k: v for k, v in result.items() if k != "layers"} | {"checkpoint": str(args.checkpoint),
                                                                  "calibration_source": calibration.source}
