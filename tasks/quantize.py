"""What the quantize step does: FP8 post-training quantization of a verified checkpoint (onerec.quant).

The calibration table is split in two disjoint halves, deterministically: the first half
calibrates (activation statistics, SQNR), the second is held out for the quality gate, so the
gate never scores FP8 on the requests that shaped it.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def split_calibration(calibration_path: str | Path, out_dir: str | Path, eval_requests: int) -> dict:
    """calibration.parquet -> {calibrate_path, eval_path}: first half / second half (at most eval_requests)."""
    from onerec.data import read_requests

    requests = read_requests(calibration_path)
    half = (len(requests) + 1) // 2
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    calibrate, held_out = requests.iloc[:half], requests.iloc[half:].iloc[:eval_requests]
    calibrate.to_parquet(out_dir / "calibrate.parquet")
    held_out.to_parquet(out_dir / "quality_eval.parquet")
    data_dir = requests_as_data_folder(held_out, out_dir / "quality_data")
    return {"calibrate_path": str(out_dir / "calibrate.parquet"), "eval_path": str(out_dir / "quality_eval.parquet"),
            "eval_data_dir": str(data_dir), "calibrate_rows": len(calibrate), "eval_rows": len(held_out)}


def requests_as_data_folder(requests, out_dir: str | Path) -> Path:
    """A request table as an onerec.data folder whose leave-last-out test split is exactly those requests.

    The quality gate (`gate quality --data DIR`) scores a data folder's test split; the pipeline
    only has the calibration requests. One pseudo-user per request: its history then its target as
    interactions in order (requests with fewer than 2 history items have no test split and drop
    out), and its profile features in users.parquet.
    """
    import pandas as pd

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [(user, item, t) for user, (history, target) in enumerate(zip(requests["history"], requests["target"], strict=True))
            for t, item in enumerate([*history, target])]
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).to_parquet(out_dir / "interactions.parquet", index=False)
    features = [c for c in requests.columns if c not in ("user_id", "history", "target")]
    if features:
        users = requests[features].reset_index(drop=True)
        users.insert(0, "user_id", range(len(users)))
        users.to_parquet(out_dir / "users.parquet", index=False)
    return out_dir
