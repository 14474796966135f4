"""Folder manifests: `manifest.json` = {relative path: {"sha256": hex, "bytes": n}}, written last.

A folder (checkpoint, quantized artifact) without a valid manifest is incomplete and is never
used. Folders are written into a temporary sibling and renamed into place (`atomic_folder`), so
a crash never leaves a half-written folder under the final name. This module imports nothing
heavy: the Airflow image (no torch) verifies downloads with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from onerec.errors import UserError

MANIFEST = "manifest.json"


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
    for name in manifest:
        check_entry_name(name, path)
    return manifest


def check_entry_name(name: str, manifest_path: str | Path) -> None:
    """Refuse an entry that is not a plain relative path inside the folder (absolute, `..`, unnormalised)."""
    rel = PurePosixPath(name)
    if not name or rel.is_absolute() or ".." in rel.parts or "\\" in name or rel.as_posix() != name:
        raise UserError(f"{manifest_path}: entry {name!r} is not a relative path inside the folder; refusing it")


def check_no_symlinks(folder: str | Path) -> None:
    """Refuse symbolic links anywhere in `folder`: a listed file must be the folder's own bytes."""
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            if path.is_symlink():
                raise UserError(f"{folder}: {path.relative_to(folder).as_posix()} is a symbolic link; refusing to load")


def verify_manifest(folder: str | Path) -> dict:
    """Check that every file in the manifest exists with its size and sha256; name the first bad one.

    Entries must be relative paths inside the folder and the folder must hold no symbolic link,
    so what is hashed (and then loaded) is always the folder's own files.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    check_no_symlinks(folder)
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
