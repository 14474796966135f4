"""`onerec-fp8 quantize`: FP8 post-training quantization of a checkpoint into a quantized folder.

    onerec-fp8 quantize --checkpoint CKPT --calibration TABLE_OR_DATA_DIR --recipe fp8_dynamic --out QDIR \
        [--exclude PATTERN ...] [--observer percentile --percentile 99.99]

Loads the checkpoint (manifest verified) in its stored precision, calibrates on the request
table, swaps the selected layers for FP8Linear and writes the quantized folder
(onerec/quant/export.py). The result JSON names every layer kept in high precision and why, the
worst layer's SQNR and the size ratio of the quantized layers vs bf16.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RECIPE_NAMES = ("fp8_dynamic", "fp8_static", "fp8_block")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder (config.json, model.safetensors, ...)")
    parser.add_argument("--calibration", required=True, help="calibration request table (parquet/csv file or folder) or a data folder to draw one from")
    parser.add_argument("--recipe", default="fp8_dynamic", choices=RECIPE_NAMES)
    parser.add_argument("--out", required=True, help="quantized folder to write")
    parser.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                        help="keep layers matching this fnmatch pattern in high precision (repeatable)")
    parser.add_argument("--observer", choices=("max", "percentile", "mse"), default=None,
                        help="fp8_static: activation-scale observer (default percentile)")
    parser.add_argument("--percentile", type=float, default=None, help="fp8_static percentile observer (default 99.99)")
    parser.add_argument("--max-requests", type=int, default=None, help="use at most this many calibration requests")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")


def recipe_options(args: argparse.Namespace) -> dict:
    from onerec.errors import UserError

    options = {k: v for k, v in (("observer", args.observer), ("percentile", args.percentile)) if v is not None}
    if options and args.recipe != "fp8_static":
        raise UserError(f"--observer/--percentile apply to fp8_static only, not {args.recipe}")
    return options


def run(
    checkpoint: str, calibration: str, recipe: str, out: str, exclude: list[str] | tuple = (),
    options: dict | None = None, max_requests: int | None = None, batch_size: int = 64, overwrite: bool = False,
) -> dict:
    """Quantize a checkpoint folder into `out`; the pipeline's quantize step calls this."""
    from onerec.checkpoint import load_checkpoint
    from onerec.errors import UserError
    from onerec.features import count_unseen
    from onerec.quant.calibrate import Calibration
    from onerec.quant.export import RECIPE, save_quantized
    from onerec.quant.recipes import make_recipe, quantize

    if batch_size < 1 or (max_requests is not None and max_requests < 1):
        raise UserError("--batch-size and --max-requests must be positive")
    config = make_recipe(recipe, exclude=list(exclude), **(options or {}))
    model, table = load_checkpoint(checkpoint)
    calib = Calibration.from_path(calibration, table, context_len=model.cfg.context_len, batch_size=batch_size,
                                  max_requests=max_requests)
    report = quantize(model, config, calib)
    save_quantized(model, table, report, out, source_checkpoint=checkpoint, overwrite=overwrite)
    written = json.loads((Path(out) / RECIPE).read_text())
    worst = report.worst_layer_sqnr
    return {
        "quantized": str(out),
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": written["source_checkpoint"]["manifest_sha256"],
        "recipe": report.recipe["name"],
        "quantized_layers": len(report.quantized),
        "excluded": report.excluded,
        "calibration_requests": report.calibration.get("num_requests"),
        "calibration_source": calib.source,
        "calibration_unseen_profile_values": count_unseen(calib.requests, model.cfg.categorical_features),
        "worst_layer": worst[0] if worst else None,
        "worst_layer_sqnr_db": worst[1] if worst else None,
        "size_ratio_vs_bf16": written["size"]["ratio_vs_bf16"],
        "size": written["size"],
    }


def main(args: argparse.Namespace) -> dict:
    return run(
        args.checkpoint, args.calibration, args.recipe, args.out, args.exclude, recipe_options(args),
        args.max_requests, args.batch_size, args.overwrite,
    )
