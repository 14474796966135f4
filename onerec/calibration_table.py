"""`onerec-fp8 data calibration`: a calibration request table drawn from a data folder.

    onerec-fp8 data calibration --data DIR --checkpoint CKPT --out calib.parquet [--requests N --seed S]

The one way a calibration table is made: the data folder is split leave-last-out (onerec.data)
with histories cut to the checkpoint's context length and each user's last `--positions`
interactions held out (the quality gate's default, 10: the positions `gate quality` scores), and
N requests are sampled (seeded) from the training part only, so no position the gate scores and
no validation target ever shapes the quantization. The
checkpoint (or quantized folder) is read for its config only. Every command that takes
`--calibration` accepts such a table (parquet/csv, or a folder holding calibration.parquet) or a
data folder, from which it draws the table the same way and says so in its result
(`calibration_source`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from onerec.errors import UserError
from onerec.manifest import sha256_file

log = logging.getLogger(__name__)

# Half calibrates, half is the pipeline's held-out quality-gate set (tasks/quantize.py).
# held-out positions per user: the last N interactions (the quality gate's default,
# onerec.quant.quality_gate.QualityGateConfig.positions; its module doc says why 10)
HELD_OUT_POSITIONS = 10
DEFAULT_REQUESTS = 2048


def is_data_folder(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and any((path / f"interactions{s}").is_file() for s in (".parquet", ".csv"))


def context_len_of(folder: str | Path) -> int:
    """The context length in a checkpoint's or quantized folder's config.json (no weights loaded)."""
    from onerec.model import OneRecV2Config  # heavy: torch

    path = Path(folder) / "config.json"
    if not path.is_file():
        raise UserError(f"{folder}: no config.json (not a checkpoint or quantized folder)")
    try:
        return OneRecV2Config.load(path).context_len
    except (ValueError, TypeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: invalid config ({exc})") from None


def draw_calibration_table(data: str | Path, context_len: int | None, requests: int = DEFAULT_REQUESTS,
                           seed: int = 0, positions: int | None = None):
    """N requests (seeded) of the data folder's training part, histories cut to `context_len`,
    the last `positions` interactions of each user held out (None: the quality gate's default)."""
    from onerec.data import calibration_requests, load_dataset, split_leave_last_out  # heavy: pandas, torch

    if requests < 1:
        raise UserError("--requests must be positive")
    positions = HELD_OUT_POSITIONS if positions is None else positions
    split = split_leave_last_out(load_dataset(data), max_history=context_len, positions=positions)
    return calibration_requests(split, requests, seed=seed)


def read_calibration(path: str | Path, context_len: int | None, requests: int = DEFAULT_REQUESTS,
                     seed: int = 0) -> tuple[object, dict]:
    """(request table, where it came from): a data folder is drawn from, anything else read."""
    from onerec.data import read_requests  # heavy: pandas, torch

    if is_data_folder(path):
        table = draw_calibration_table(path, context_len, requests, seed)
        log.info("calibration: drew %d training requests from data folder %s (seed %d)", len(table), path, seed)
        return table, {"kind": "drawn from data folder", "data": str(path), "requests": len(table), "seed": seed,
                       "split": "train", "held_out_positions": HELD_OUT_POSITIONS}
    table = read_requests(path)
    return table, {"kind": "request table", "path": str(path), "requests": len(table)}


def write_calibration_table(table, out: str | Path, overwrite: bool = False) -> Path:
    """Write parquet atomically (a reader never sees half a file)."""
    out = Path(out)
    if out.suffix != ".parquet":
        raise UserError(f"--out {out}: write a .parquet file")
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; choose another --out or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    table.to_parquet(tmp, index=False)
    os.replace(tmp, out)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="data folder (interactions.parquet|csv, users, items)")
    parser.add_argument("--checkpoint", required=True, help="checkpoint or quantized folder (its context length)")
    parser.add_argument("--out", required=True, help="calibration table to write (.parquet)")
    parser.add_argument("--requests", type=int, default=DEFAULT_REQUESTS, help="requests to draw (at most)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--positions", type=int, default=None,
                        help="each user's last N interactions stay out (default: the quality gate's positions, 10)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


def main(args: argparse.Namespace) -> dict:
    from onerec.features import profile_columns  # heavy: pandas

    context_len = context_len_of(args.checkpoint)
    table = draw_calibration_table(args.data, context_len, args.requests, args.seed, args.positions)
    out = write_calibration_table(table, args.out, args.overwrite)

    profile = [c for c in table.columns if c not in ("user_id", "history", "target")]
    numeric, categorical = profile_columns(table[profile]) if profile else ([], [])
    return {
        "calibration": str(out), "sha256": sha256_file(out), "data": str(args.data), "checkpoint": str(args.checkpoint),
        "requests": len(table), "users": int(table["user_id"].nunique()), "seed": args.seed, "split": "train",
        "held_out_positions": args.positions or HELD_OUT_POSITIONS,
        "context_len": context_len, "profile_features": {"numeric": numeric, "categorical": categorical},
    }
