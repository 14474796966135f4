"""`onerec-fp8 quantize`: FP8 post-training quantization of a checkpoint into a quantized folder.

    onerec-fp8 quantize --checkpoint CKPT --calibration TABLE_OR_DATA_DIR --recipe fp8_dynamic --out QDIR \
        [--exclude PATTERN ...] [--observer percentile --percentile 99.99] [--layer-choice timed]

Loads the checkpoint (manifest verified) in its stored precision, calibrates on the request
table, swaps the selected layers for FP8Linear and writes the quantized folder
(`onerec.quant.export.quantize_folder`). The result JSON names every layer kept in high precision and why, the
worst layer's SQNR and the size ratio of the quantized layers vs bf16.
"""

from __future__ import annotations

import argparse

from onerec.errors import UserError

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
    parser.add_argument("--layer-choice", choices=("all", "timed"), default=None,
                        help="fp8_dynamic: timed = FP8 only for layers whose GEMM is faster in FP8 on this CUDA GPU "
                             "at one user (default all)")
    parser.add_argument("--max-requests", type=int, default=None, help="use at most this many calibration requests")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")


def recipe_options(args: argparse.Namespace) -> dict:
    options = {k: v for k, v in (("observer", args.observer), ("percentile", args.percentile)) if v is not None}
    if options and args.recipe != "fp8_static":
        raise UserError(f"--observer/--percentile apply to fp8_static only, not {args.recipe}")
    if args.layer_choice is not None:
        if args.recipe != "fp8_dynamic":
            raise UserError(f"--layer-choice applies to fp8_dynamic only, not {args.recipe}")
        options["layer_choice"] = args.layer_choice
    return options


def main(args: argparse.Namespace) -> dict:
    from onerec.quant.export import quantize_folder  # heavy: safetensors, torch

    return quantize_folder(
        args.checkpoint, args.calibration, args.recipe, args.out, args.exclude, recipe_options(args),
        args.max_requests, args.batch_size, args.overwrite,
    )
