"""Checkpoint folders (the data contract in docs/architecture.md).

A checkpoint folder holds config.json, model.safetensors, semantic_ids.npy and manifest.json
(onerec/manifest.py: every file's sha256 and size, written last). Weights are safetensors only:
nothing here ever unpickles. `load_model_folder` loads either kind of model folder: a checkpoint
or a quantized folder (onerec/quant/export.py, recognised by its recipe.json).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from onerec.errors import UserError
from onerec.manifest import atomic_folder, verify_manifest, write_manifest
from onerec.model import OneRecV2, OneRecV2Config, approx_parameters
from onerec.semantic_ids import load_table, validate_table

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
SEMANTIC_IDS = "semantic_ids.npy"


MAX_SAFETENSORS_HEADER = 100 << 20  # the safetensors library's own limit


def check_weights_file(path: Path) -> None:
    """UserError unless `path` starts like a safetensors file whose JSON header fits in it (and in
    100 MiB): checked before the library reads, parses or allocates anything."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise UserError(f"{path}: cannot read the weights ({exc.strerror})") from None
    header = int.from_bytes(head, "little") if len(head) == 8 else -1
    if not 2 <= header <= min(MAX_SAFETENSORS_HEADER, size - 8):
        raise UserError(f"{path}: not a safetensors file (header of {header} bytes in a file of {size} bytes)")


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a damaged or hostile file is a one-line UserError."""
    from safetensors import SafetensorError  # heavy: safetensors

    check_weights_file(path)
    try:
        return load_file(str(path))
    except SafetensorError as exc:
        raise UserError(f"{path}: unreadable safetensors file ({exc})") from None


def save_checkpoint(
    model: OneRecV2, table: np.ndarray, out: str | Path, overwrite: bool = False,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write a checkpoint folder; `extra(folder)` may add files (e.g. training metrics) before the manifest."""
    validate_table(table, model.cfg.codebook_size)
    with atomic_folder(out, overwrite) as tmp:
        model.cfg.save(tmp / CONFIG)
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        np.save(tmp / SEMANTIC_IDS, table.astype(np.int32), allow_pickle=False)
        if extra is not None:
            extra(tmp)
        write_manifest(tmp)
    return Path(out)


def load_checkpoint(
    folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, verify: bool = True,
) -> tuple[OneRecV2, np.ndarray]:
    """Load (model in eval mode, semantic-id table). Verifies the manifest first unless told not to."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"checkpoint {folder} does not exist or is not a folder")
    if verify:
        verify_manifest(folder)
    try:
        cfg = OneRecV2Config.load(folder / CONFIG)
    except (ValueError, TypeError, json.JSONDecodeError) as exc:
        raise UserError(f"{folder / CONFIG}: invalid config ({exc})") from None
    weights = folder / WEIGHTS
    check_weights_file(weights)
    if weights.stat().st_size < (n := approx_parameters(cfg)):  # even FP8 takes a byte a parameter
        raise UserError(f"{weights}: {weights.stat().st_size} bytes cannot hold the ~{n:.3g} parameters "
                        f"that {CONFIG} describes")
    model = OneRecV2(cfg)
    state = load_weights(weights)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{folder / WEIGHTS}: weights do not fit the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    table = load_table(folder / SEMANTIC_IDS)
    return model.eval(), table
