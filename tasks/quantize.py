"""What the quantize step does: FP8 post-training quantization of a verified checkpoint (onerec.quant).

The calibration table is split by user in two disjoint halves, deterministically (users in the
order the table first lists them): the first half's requests calibrate (activation statistics,
SQNR), the second half's users are held out for the quality gate, so no position the gate scores
and no history of a held-out user ever shaped the quantization. The gate scores each held-out
user's last `positions` interactions: those of the user's longest request (its history, then its
target), each predicted from the items before it.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def split_calibration(calibration_path: str | Path, out_dir: str | Path, eval_users: int) -> dict:
    """calibration.parquet -> {calibrate_path, eval_path}: the first half's users' requests / one
    request (the longest) of each of the second half's users, at most `eval_users` of them."""
    from onerec.data import read_requests  # heavy: torch

    requests = read_requests(calibration_path)
    users = requests["user_id"].unique()  # in order of first appearance
    held = requests["user_id"].isin(users[(len(users) + 1) // 2:])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    calibrate = requests[~held]
    longest = requests[held]["history"].map(len).groupby(requests[held]["user_id"], sort=False).idxmax()
    held_out = requests.loc[longest.to_numpy()[:eval_users]].reset_index(drop=True)
    calibrate.to_parquet(out_dir / "calibrate.parquet")
    held_out.to_parquet(out_dir / "quality_eval.parquet")
    data_dir = requests_as_data_folder(held_out, out_dir / "quality_data")
    return {"calibrate_path": str(out_dir / "calibrate.parquet"), "eval_path": str(out_dir / "quality_eval.parquet"),
            "eval_data_dir": str(data_dir), "calibrate_rows": len(calibrate), "eval_rows": len(held_out)}


def requests_as_data_folder(requests, out_dir: str | Path) -> Path:
    """A request table as an onerec.data folder whose leave-last-out test split is those requests.

    The quality gate (`gate quality --data DIR`) scores a data folder's test split; the pipeline
    only has the calibration requests. One pseudo-user per request: its history then its target as
    interactions in order (requests with fewer than 2 history items have no test split and drop
    out), and its profile features in users.parquet. With `positions` N the test split holds the
    request itself and the N - 1 positions before it (each its history's prefix and next item).
    """
    import pandas as pd  # heavy: pandas

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
