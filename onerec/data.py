"""Interaction data: the input folder format, the leave-last-out split, request tables and batches.

A data folder holds interactions.parquet or interactions.csv (user_id, item_id, timestamp; other
columns, e.g. MovieLens' rating, are ignored), and optionally users.parquet/csv (user_id +
profile columns: numeric, string or categorical, missing values allowed; onerec/features.py) and
items.parquet/csv (item_id + feature columns). Item features only shape the semantic IDs
(onerec.semantic_ids.feature_embeddings): float columns as z-scores, other columns with at most 256
distinct values as categories; any other item column (free text, ids) is ignored, and logged.

Everything downstream (training, evaluation, calibration, the quality gate, serving tests)
works on one table shape, a *request table*: one row per request with columns
    user_id (int), history (list of item ids, newest last), target (int item id),
plus one column per profile feature (float for numeric features, missing values filled with the
users' mean; the raw string, possibly missing, for categorical ones). calibration.parquet in S3
is exactly such a table.

Split (leave-last-out by time, per user): the last interaction is the test target, the one
before it the validation target, every earlier one a training target (predicted from the
items before it). Calibration requests are drawn from the training part only. With
`positions=N` the test part holds each user's last N interactions, each predicted from the
items before it (N requests per user, fewer for users with short histories), the validation
target is the one before them: more evidence per user for evaluation and the quality gate.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from onerec.errors import UserError
from onerec.features import encode_profiles, profile_columns
from onerec.semantic_ids import encode_histories

log = logging.getLogger(__name__)

REQUEST_COLUMNS = ("user_id", "history", "target")


def _read_table(folder: Path, stem: str, required: bool) -> pd.DataFrame | None:
    for suffix, reader in ((".parquet", pd.read_parquet), (".csv", pd.read_csv)):
        path = folder / f"{stem}{suffix}"
        if path.is_file():
            try:
                return reader(path)
            except Exception as exc:  # a corrupt file is the user's to fix: name it
                raise UserError(f"{path}: cannot be read ({exc})") from None
    if required:
        raise UserError(f"{folder}: no {stem}.parquet or {stem}.csv")
    return None


@dataclass
class Dataset:
    interactions: pd.DataFrame  # user_id, item_id, timestamp (sorted by user, time)
    users: pd.DataFrame | None  # user_id + profile columns (numeric, string or categorical)
    items: pd.DataFrame | None  # item_id + feature columns

    @property
    def profile_features(self) -> list[str]:
        """The numeric profile columns."""
        return [] if self.users is None else profile_columns(self.users)[0]

    @property
    def categorical_features(self) -> list[str]:
        """The string / categorical profile columns."""
        return [] if self.users is None else profile_columns(self.users)[1]

    @property
    def num_items(self) -> int:
        return int(self.interactions["item_id"].max()) + 1


def load_dataset(folder: str | Path) -> Dataset:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"data folder {folder} does not exist")
    inter = _read_table(folder, "interactions", required=True)
    missing = {"user_id", "item_id", "timestamp"} - set(inter.columns)
    if missing:
        raise UserError(f"{folder}/interactions: missing columns {sorted(missing)}")
    inter = inter[["user_id", "item_id", "timestamp"]]
    if inter.isna().any().any():
        raise UserError(f"{folder}/interactions: has empty values")
    for col in ("user_id", "item_id"):
        if not pd.api.types.is_integer_dtype(inter[col]) or (inter[col] < 0).any():
            raise UserError(f"{folder}/interactions: {col} must be non-negative integers")
    inter = inter.sort_values(["user_id", "timestamp"], kind="stable").reset_index(drop=True)
    users = _read_table(folder, "users", required=False)
    if users is not None:
        if "user_id" not in users.columns:
            raise UserError(f"{folder}/users: missing column user_id")
        profile_columns(users, f"{folder}/users")  # refuses column types that are neither
        if users["user_id"].duplicated().any():
            raise UserError(f"{folder}/users: user_id must be unique (one profile row per user)")
        users = users.set_index("user_id", drop=False).sort_index()
    items = _read_table(folder, "items", required=False)
    return Dataset(inter, users, items)


@dataclass
class Split:
    train: pd.DataFrame  # request tables (module doc)
    valid: pd.DataFrame
    test: pd.DataFrame


def _attach_profiles(requests: pd.DataFrame, dataset: Dataset) -> pd.DataFrame:
    if dataset.users is None:
        return requests
    numeric, categorical = dataset.profile_features, dataset.categorical_features
    rows = dataset.users.reindex(requests["user_id"].to_numpy())
    num = rows[numeric].fillna(dataset.users[numeric].mean()).astype("float32")
    cat = rows[categorical].astype("string")  # missing stays missing: the unknown bucket
    return pd.concat([requests.reset_index(drop=True), num.reset_index(drop=True), cat.reset_index(drop=True)], axis=1)


def split_leave_last_out(dataset: Dataset, max_history: int | None = None, min_interactions: int = 3,
                         positions: int = 1) -> Split:
    """Per user: the last `positions` items are test targets, the one before the validation target, the rest train.

    Users with fewer than `min_interactions` interactions only contribute training requests; a
    user with fewer than positions + 2 interactions gets fewer test positions (every held-out
    user keeps a validation target with a history). `max_history` keeps the newest items of
    each history (the model's context length).
    """
    if positions < 1:
        raise UserError(f"positions must be at least 1, got {positions}")
    rows: dict[str, list] = {"train": [], "valid": [], "test": []}
    inter = dataset.interactions
    groups = inter.groupby("user_id", sort=True)["item_id"].apply(np.asarray)
    for user, items in groups.items():
        n = len(items)
        first_test = max(2, n - positions) if n >= min_interactions else n
        for t in range(1, n):
            part = "train" if t < first_test - 1 else ("valid" if t == first_test - 1 else "test")
            start = 0 if max_history is None else max(0, t - max_history)
            rows[part].append((int(user), items[start:t].tolist(), int(items[t])))
    frames = {
        part: _attach_profiles(pd.DataFrame(r, columns=list(REQUEST_COLUMNS)), dataset) for part, r in rows.items()
    }
    return Split(**frames)


def training_interactions(dataset: Dataset, min_interactions: int = 3, positions: int = 1) -> pd.DataFrame:
    """The interactions that `split_leave_last_out` uses as training targets or histories only.

    Drops each user's validation and test targets (the last positions + 1 interactions, the first
    two always kept) when the user has at least `min_interactions`; what the tokenizer and the
    popularity baseline may learn from.
    """
    inter = dataset.interactions
    by_user = inter.groupby("user_id", sort=False)
    n = by_user["item_id"].transform("size").to_numpy()
    position = by_user.cumcount().to_numpy()
    keep = (n < min_interactions) | (position < np.maximum(1, n - positions - 1))
    return inter[keep].reset_index(drop=True)


def held_out_requests(dataset: Dataset, part: str = "test", max_history: int | None = None, positions: int = 1,
                      max_users: int | None = None, seed: int = 0, source: str = "data") -> pd.DataFrame:
    """The `part` (test or valid) requests of the leave-last-out split: `positions` per user for
    test, all users or a seeded sample of `max_users` (a sampled user keeps all positions)."""
    if part not in ("test", "valid"):
        raise UserError(f"split must be test or valid, got {part!r}")
    requests = getattr(split_leave_last_out(dataset, max_history=max_history, positions=positions), part)
    if requests.empty:
        raise UserError(f"{source}: no {part} requests (users need at least 3 interactions)")
    users = requests["user_id"].unique()
    if max_users is not None and max_users < len(users):
        chosen = np.random.default_rng(seed).choice(users, max_users, replace=False)
        requests = requests[requests["user_id"].isin(chosen)].reset_index(drop=True)
    return requests


def calibration_requests(split: Split, n: int = 512, seed: int = 0) -> pd.DataFrame:
    """A calibration table: `n` requests sampled from the training part (never validation/test targets)."""
    train = split.train
    if train.empty:
        raise UserError("no training requests to draw calibration data from")
    take = min(n, len(train))
    return train.sample(n=take, random_state=seed).reset_index(drop=True)


def read_requests(path: str | Path) -> pd.DataFrame:
    """A request table from a parquet/csv file, or from a folder holding calibration.parquet."""
    path = Path(path)
    if path.is_dir():
        path = path / "calibration.parquet"
    if not path.is_file():
        raise UserError(f"request table {path} does not exist")
    try:
        df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except Exception as exc:
        raise UserError(f"{path}: cannot be read ({exc})") from None
    missing = set(REQUEST_COLUMNS) - set(df.columns)
    if missing:
        raise UserError(f"{path}: missing columns {sorted(missing)}")
    # CSV stores the lists as text ("[3, 5, 8]"); parquet as real lists.
    df["history"] = df["history"].map(lambda h: [int(i) for i in (json.loads(h) if isinstance(h, str) else h)])
    return df


@dataclass
class Batch:
    history_sids: torch.Tensor  # [B, T, n_levels] left-padded
    history_mask: torch.Tensor  # [B, T]
    profile: torch.Tensor | None  # [B, P] raw feature values (normalised inside the model)
    target_sids: torch.Tensor  # [B, n_levels]; -1 rows where the target item is unknown
    target_items: torch.Tensor  # [B]
    user_ids: torch.Tensor  # [B]
    unknown_items: list[int]  # history items dropped per request (unknown to the tokenizer)

    def to(self, device) -> Batch:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Batch(
            move(self.history_sids), move(self.history_mask), move(self.profile), move(self.target_sids),
            move(self.target_items), move(self.user_ids), self.unknown_items,
        )


def make_batch(requests: pd.DataFrame, table: np.ndarray, context_len: int, profile_features: list[str],
               categorical: dict[str, list[str]] | None = None) -> Batch:
    """`profile_features`/`categorical`: the model's numeric features and vocabularies (its config)."""
    sids, mask, unknown = encode_histories(requests["history"].tolist(), table, context_len)
    # np.array copies: pandas may hand out read-only views, which torch.from_numpy warns about.
    targets = np.array(requests["target"], dtype=np.int64) if "target" in requests else np.full(len(requests), -1)
    inside = (targets >= 0) & (targets < len(table))
    target_sids = np.full((len(targets), table.shape[1]), -1, dtype=np.int64)
    target_sids[inside] = table[targets[inside]]
    values, _ = encode_profiles(requests, profile_features, categorical or {})
    profile = None if values is None else torch.from_numpy(values)
    user_ids = np.array(requests["user_id"], dtype=np.int64) if "user_id" in requests else np.zeros(len(requests), np.int64)
    return Batch(sids, mask, profile, torch.from_numpy(target_sids), torch.from_numpy(targets), torch.from_numpy(user_ids), unknown)


def iter_batches(
    requests: pd.DataFrame, table: np.ndarray, context_len: int, profile_features: list[str],
    batch_size: int, shuffle: bool = False, seed: int = 0, categorical: dict[str, list[str]] | None = None,
) -> Iterator[Batch]:
    order = np.random.default_rng(seed).permutation(len(requests)) if shuffle else np.arange(len(requests))
    for start in range(0, len(order), batch_size):
        yield make_batch(requests.iloc[order[start : start + batch_size]], table, context_len, profile_features,
                         categorical)
