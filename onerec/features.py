"""User profile features: which columns are numeric or categorical, vocabularies and encoding.

A users table (onerec/data.py) carries numeric columns (int, float, bool) and categorical ones
(string, object or pandas categorical). Numeric features are normalised inside the model by the
training mean/std stored in its weights (ContextProcessor.profile_mean/std). A categorical
feature becomes a vocabulary, built at training from the training users: the values held by at
least `min_count` of them, the `max_values` most frequent, most frequent first. Bucket 0 is
reserved for unknown values: missing ones, values too rare to keep and values never seen in
training. The vocabularies live in the checkpoint's config.json (`categorical_features`, plain
JSON lists, no pickle), so every folder and loader that carries the config carries them; a
config without them is a numeric-only model, as checkpoints written before them are.

Values are compared as strings: a categorical column read as integers (e.g. a zip code in a CSV)
is numeric; cast it to string in the users file to make it categorical.

The model's profile tensor is [B, numeric + categorical]: the numeric values, then each
categorical feature's bucket id (features ordered by name) as a float (exact in float32 far beyond any vocabulary size),
so the tensor travels through batching, calibration, the engines and serving unchanged. An
unseen value is never an error: it takes bucket 0 and is counted (`unseen_values`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from onerec.errors import UserError

UNKNOWN_BUCKET = 0
# Defaults of the vocabulary: a value needs a few users to learn an embedding from (the rare rest
# trains the unknown bucket, which unseen values use); the cap bounds the table (max_values x
# d_model parameters) for high-cardinality columns such as postcodes.
MAX_VALUES = 10_000
MIN_COUNT = 5


def is_categorical(values: pd.Series) -> bool:
    return (
        isinstance(values.dtype, pd.CategoricalDtype)
        or pd.api.types.is_string_dtype(values.dtype)
        or pd.api.types.is_object_dtype(values.dtype)
    )


def profile_columns(users: pd.DataFrame, source: str = "users") -> tuple[list[str], list[str]]:
    """(numeric, categorical) profile column names of a users table; other types are refused."""
    numeric, categorical, refused = [], [], []
    for col in users.columns:
        if col == "user_id":
            continue
        values = users[col]
        if is_categorical(values):
            categorical.append(col)
        elif pd.api.types.is_numeric_dtype(values.dtype) and not pd.api.types.is_complex_dtype(values.dtype):
            numeric.append(col)
        else:
            refused.append(f"{col} ({values.dtype})")
    if refused:
        raise UserError(f"{source}: profile columns must be numeric, string or categorical, not {refused}")
    return numeric, categorical


def as_strings(values) -> pd.Series:
    """A column as pandas strings, missing values kept as <NA>."""
    return pd.Series(values, copy=False).astype("string")


def build_vocabulary(values: pd.Series, max_values: int = MAX_VALUES, min_count: int = MIN_COUNT) -> list[str]:
    """The kept values, most frequent first (ties by value); bucket i + 1 is vocabulary[i]."""
    counts = as_strings(values).dropna().value_counts()
    counts = counts[counts >= min_count]
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return [value for value, _ in ranked[:max_values]]


def build_vocabularies(users: pd.DataFrame, columns: list[str], max_values: int = MAX_VALUES,
                       min_count: int = MIN_COUNT) -> dict[str, list[str]]:
    if max_values < 1 or min_count < 1:
        raise UserError("the vocabulary needs max_values >= 1 and min_count >= 1")
    return {col: build_vocabulary(users[col], max_values, min_count) for col in sorted(columns)}


def encode_categorical(values, vocabulary: list[str]) -> tuple[np.ndarray, int]:
    """(bucket ids int64 [N], number of unseen values): missing and unseen values take bucket 0.

    Missing values are expected (the unknown bucket learnt them at training) and not counted.
    """
    strings = as_strings(values)
    codes = pd.Categorical(strings, categories=vocabulary).codes.astype(np.int64) + 1
    unseen = int(((codes == UNKNOWN_BUCKET) & strings.notna().to_numpy()).sum())
    return codes, unseen


def encode_profiles(requests: pd.DataFrame, numeric: list[str], categorical: dict[str, list[str]]
                    ) -> tuple[np.ndarray | None, dict[str, int]]:
    """The model's profile matrix float32 [N, numeric + categorical] and unseen values per feature."""
    names = list(numeric) + list(categorical)
    if not names:
        return None, {}
    missing = [f for f in names if f not in requests.columns]
    if missing:
        raise UserError(f"requests lack profile features {missing} that the model needs")
    out = np.empty((len(requests), len(names)), dtype=np.float32)
    if numeric:
        out[:, : len(numeric)] = np.asarray(requests[numeric], dtype=np.float32)
    unseen = {}
    for i, (name, vocabulary) in enumerate(categorical.items()):
        codes, unseen[name] = encode_categorical(requests[name], vocabulary)
        out[:, len(numeric) + i] = codes
    return out, unseen


def count_unseen(requests: pd.DataFrame, categorical: dict[str, list[str]]) -> dict[str, int]:
    """Per categorical feature: request values that are not in the model's vocabulary (not missing)."""
    return {name: encode_categorical(requests[name], vocab)[1] for name, vocab in categorical.items()
            if name in requests.columns}
