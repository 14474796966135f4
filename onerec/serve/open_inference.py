"""Open Inference Protocol (KServe v2 REST) tensors of the recommend call.

POST /v2/models/{name}/infer takes the inputs that GET /v2/models/{name} advertises (both built
here, so the two cannot disagree):
- history INT64 [users, positions]: item ids, newest last; -1 is padding (rows of unequal length
  are padded with it, anywhere in the row);
- profile FP32 [users, numeric features] (only when the model has numeric profile features),
  columns in the order of the metadata's parameters.profile_features; omitted: every user takes
  the model's training means;
- categorical_profile BYTES [users, categorical features] (only when the model has them), columns
  in the order of parameters.categorical_profile_features; omitted: the unknown bucket.
Request parameters k and beam as on /v1/recommend. The outputs: items INT64 [users, k] (best first,
-1 where a user has fewer than k items), scores FP32 [users, k] (summed log-probabilities; the
lowest float32 where items is -1), unknown_items and truncated_items INT64 [users] (what /v1 says
per user). Tensor data may be flat (row-major) or nested, as the protocol allows; the binary tensor
extension is not offered (the server metadata lists no extension) and is refused with a clear 400.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from onerec.serve.schemas import FLOAT32_MAX, HARD_MAX_BEAM, MAX_CATEGORY_CHARS, MAX_HISTORY_ITEMS

HISTORY, PROFILE, CATEGORICAL = "history", "profile", "categorical_profile"
ITEMS, SCORES, UNKNOWN, TRUNCATED = "items", "scores", "unknown_items", "truncated_items"
PADDING_ITEM = -1
PADDING_SCORE = -FLOAT32_MAX
MAX_DIMS = 4

Name = Annotated[str, StringConstraints(min_length=1, max_length=128)]


class InferInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name
    shape: list[Annotated[int, Field(strict=True, ge=0)]] = Field(max_length=MAX_DIMS)
    datatype: Annotated[str, StringConstraints(max_length=16)]
    data: list[Any]
    parameters: dict[Name, Any] | None = None


class RequestedOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name
    parameters: dict[Name, Any] | None = None


class InferParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    k: int | None = Field(default=None, strict=True, ge=1, le=HARD_MAX_BEAM)
    beam: int | None = Field(default=None, strict=True, ge=1, le=HARD_MAX_BEAM)
    binary_data_output: bool = False  # the binary extension's switch: only False is served


class InferRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: Annotated[str, StringConstraints(max_length=256)] | None = None
    parameters: InferParameters | None = None
    inputs: list[InferInput] = Field(min_length=1, max_length=8)
    outputs: list[RequestedOutput] | None = Field(default=None, max_length=8)


class TensorError(ValueError):
    """A request whose tensors do not fit the model's metadata (answered 422, or 400 for the binary
    extension)."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


def model_tensors(profile_features: list[str], categorical_features: list[str]) -> tuple[list[dict], list[dict]]:
    """The (inputs, outputs) of the model metadata, for a model with these profile features."""
    inputs = [{"name": HISTORY, "datatype": "INT64", "shape": [-1, -1]}]
    if profile_features:
        inputs.append({"name": PROFILE, "datatype": "FP32", "shape": [-1, len(profile_features)]})
    if categorical_features:
        inputs.append({"name": CATEGORICAL, "datatype": "BYTES", "shape": [-1, len(categorical_features)]})
    outputs = [
        {"name": ITEMS, "datatype": "INT64", "shape": [-1, -1]},
        {"name": SCORES, "datatype": "FP32", "shape": [-1, -1]},
        {"name": UNKNOWN, "datatype": "INT64", "shape": [-1]},
        {"name": TRUNCATED, "datatype": "INT64", "shape": [-1]},
    ]
    return inputs, outputs


def _flatten(data: list, name: str) -> list:
    """Nested (row-major) or flat tensor data as one flat list."""
    flat, stack = [], [(iter(data), 1)]
    while stack:
        items, depth = stack[-1]
        for value in items:
            if isinstance(value, list):
                if depth >= MAX_DIMS:
                    raise TensorError(f"input {name!r}: data nested deeper than {MAX_DIMS} levels")
                stack.append((iter(value), depth + 1))
                break
            flat.append(value)
        else:
            stack.pop()
    return flat


def _tensor(tensor: InferInput, expected: dict) -> np.ndarray | list[str]:
    """The tensor's data, checked against its metadata entry (datatype, rank, fixed dimensions)."""
    name = tensor.name
    if tensor.datatype != expected["datatype"]:
        raise TensorError(f"input {name!r}: datatype must be {expected['datatype']}, not {tensor.datatype!r}")
    if len(tensor.shape) != len(expected["shape"]):
        raise TensorError(f"input {name!r}: shape must have {len(expected['shape'])} dimensions "
                          f"{expected['shape']}, got {tensor.shape}")
    for dim, (got, want) in enumerate(zip(tensor.shape, expected["shape"], strict=True)):
        if want >= 0 and got != want:
            raise TensorError(f"input {name!r}: dimension {dim} must be {want}, got {got}")
    if (tensor.parameters or {}).get("binary_data_size") is not None:
        raise TensorError(f"input {name!r}: binary tensor data is not supported; send the data as JSON", 400)
    flat = _flatten(tensor.data, name)
    if len(flat) != math.prod(tensor.shape):
        raise TensorError(f"input {name!r}: shape {tensor.shape} needs {math.prod(tensor.shape)} values, "
                          f"the data has {len(flat)}")
    if tensor.datatype == "BYTES":
        if not all(isinstance(v, str) and len(v) <= MAX_CATEGORY_CHARS for v in flat):
            raise TensorError(f"input {name!r}: BYTES values must be strings of at most {MAX_CATEGORY_CHARS} chars")
        return flat
    if tensor.datatype == "INT64":
        if not all(type(v) is int and -(2**63) <= v < 2**63 for v in flat):
            raise TensorError(f"input {name!r}: INT64 values must be integers within int64")
        return np.array(flat, dtype=np.int64).reshape(tensor.shape)
    if not all(type(v) in (int, float) and math.isfinite(v) and abs(v) <= FLOAT32_MAX for v in flat):
        raise TensorError(f"input {name!r}: FP32 values must be finite numbers within float32")
    return np.array(flat, dtype=np.float32).reshape(tensor.shape)


def parse_users(req: InferRequest, profile_features: list[str], categorical_features: list[str],
                max_users: int) -> list[tuple[list[int], dict[str, float | str] | None]]:
    """Per user: (history, profile by feature name or None), from the request's tensors."""
    expected = {t["name"]: t for t in model_tensors(profile_features, categorical_features)[0]}
    given: dict[str, InferInput] = {}
    for tensor in req.inputs:
        if tensor.name not in expected:
            raise TensorError(f"unknown input {tensor.name!r}; this model takes {sorted(expected)}")
        if tensor.name in given:
            raise TensorError(f"input {tensor.name!r} given twice")
        given[tensor.name] = tensor
    if HISTORY not in given:
        raise TensorError(f"input {HISTORY!r} is required (INT64 [users, positions], {PADDING_ITEM} = padding)")
    values = {name: _tensor(tensor, expected[name]) for name, tensor in given.items()}
    history = values[HISTORY]
    n_users, positions = history.shape
    if not 1 <= n_users <= max_users:
        raise TensorError(f"input {HISTORY!r}: {n_users} users; send 1 to {max_users} per request")
    if positions > MAX_HISTORY_ITEMS:
        raise TensorError(f"input {HISTORY!r}: at most {MAX_HISTORY_ITEMS} positions per user, got {positions}")
    if ((history < 0) & (history != PADDING_ITEM)).any():
        raise TensorError(f"input {HISTORY!r}: item ids are >= 0 ({PADDING_ITEM} is padding)")
    for name in (PROFILE, CATEGORICAL):
        if name in given and given[name].shape[0] != n_users:
            raise TensorError(f"input {name!r}: {given[name].shape[0]} rows for {n_users} users")
    users = []
    for i in range(n_users):
        row = history[i]
        profile: dict[str, float | str] = {}
        if PROFILE in values:
            profile.update(zip(profile_features, values[PROFILE][i].tolist(), strict=True))
        if CATEGORICAL in values:
            width = len(categorical_features)
            profile.update(zip(categorical_features, values[CATEGORICAL][i * width:(i + 1) * width], strict=True))
        users.append((row[row != PADDING_ITEM].tolist(), profile or None))
    return users


def check_outputs(req: InferRequest) -> list[str]:
    """The names of the outputs to answer with (all when the request names none)."""
    names = [o["name"] for o in model_tensors([], [])[1]]
    if (req.parameters and req.parameters.binary_data_output) or any(
            (o.parameters or {}).get("binary_data") for o in req.outputs or []):
        raise TensorError("binary tensor data is not supported; ask for JSON outputs (binary_data: false)", 400)
    if req.outputs is None:
        return names
    asked = [o.name for o in req.outputs]
    unknown = sorted(set(asked) - set(names))
    if unknown:
        raise TensorError(f"unknown outputs {unknown}; this model answers {names}")
    return list(dict.fromkeys(asked))


def response_tensors(results: list, k: int, names: list[str]) -> list[dict]:
    """The outputs for `results` (onerec.serve.app.UserResult per user), in the order of `names`."""
    items = np.full((len(results), k), PADDING_ITEM, np.int64)
    scores = np.full((len(results), k), PADDING_SCORE, np.float32)
    for i, r in enumerate(results):
        items[i, : len(r.items)] = r.items
        scores[i, : len(r.scores)] = r.scores
    tensors = {
        ITEMS: ("INT64", items), SCORES: ("FP32", scores),
        UNKNOWN: ("INT64", np.array([r.unknown_items for r in results], np.int64)),
        TRUNCATED: ("INT64", np.array([r.truncated_items for r in results], np.int64)),
    }
    return [{"name": n, "datatype": tensors[n][0], "shape": list(tensors[n][1].shape),
             "data": tensors[n][1].ravel().tolist()} for n in names]
