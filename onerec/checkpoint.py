"""Checkpoint folders and their manifests (the data contract in docs/architecture.md).

A checkpoint folder holds config.json, model.safetensors, semantic_ids.npy and manifest.json:
`{relative path: {"sha256": hex, "bytes": n}}` for every other file, written last. A folder
without a valid manifest is incomplete. Folders are written into a temporary sibling and renamed
into place, so a crash never leaves a half-written folder under the final name. Weights are
safetensors only: nothing here ever unpickles.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from onerec.errors import UserError
from onerec.model import OneRecV2, OneRecV2Config
from onerec.semantic_ids import load_table, validate_table

MANIFEST = "manifest.json"
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
SEMANTIC_IDS = "semantic_ids.npy"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: str | Path) -> dict:
    """Hash every file under `folder` (but the manifest) and write manifest.json atomically, last."""
    folder = Path(folder)
    manifest = {
        p.relative_to(folder).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")
    }
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, folder / MANIFEST)
    return manifest


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise UserError(f"{folder}: no {MANIFEST}; the folder is incomplete")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or not all(
        isinstance(v, dict) and {"sha256", "bytes"} <= set(v) for v in manifest.values()
    ):
        raise UserError(f"{path}: expected {{file: {{sha256, bytes}}}}")
    return manifest


def verify_manifest(folder: str | Path) -> dict:
    """Check that every file in the manifest exists with its size and sha256; name the first bad one."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    for name, entry in manifest.items():
        path = folder / name
        if not path.is_file():
            raise UserError(f"{folder}: {name} is listed in the manifest but missing")
        if path.stat().st_size != entry["bytes"]:
            raise UserError(f"{folder}: {name} has {path.stat().st_size} bytes, manifest says {entry['bytes']}")
        if sha256_file(path) != entry["sha256"]:
            raise UserError(f"{folder}: {name} does not match its sha256 in the manifest (corrupted or altered)")
    return manifest


def manifest_digest(folder: str | Path) -> str:
    """One sha256 that identifies the folder's content: the hash of its manifest file."""
    return sha256_file(Path(folder) / MANIFEST)


@contextmanager
def atomic_folder(out: str | Path, overwrite: bool = False):
    """Yield a temporary folder beside `out`; on success it is renamed to `out`, on error removed."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; choose another --out or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
    model = OneRecV2(cfg)
    state = load_file(str(folder / WEIGHTS))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{folder / WEIGHTS}: weights do not fit the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    table = load_table(folder / SEMANTIC_IDS)
    return model.eval(), table
