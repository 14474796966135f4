"""S3 side of the checkpoint contract: find the newest complete checkpoint, download and verify it.

    s3://BUCKET/PREFIX/checkpoints/<sortable-id>/{config.json, model.safetensors, semantic_ids.npy,
                                                  manifest.json (written last)}
    s3://BUCKET/PREFIX/calibration/<YYYY-MM-DD>/<sha256>.parquet  the table, under its content's digest
    s3://BUCKET/PREFIX/calibration/<YYYY-MM-DD>/calibration.json  {calibration_uri, calibration_sha256}:
                                                                  the date's current table (written last)
    s3://BUCKET/PREFIX/calibration/profiles/<sha256>.json         a validated table's profile
    s3://BUCKET/PREFIX/calibration/accepted/profile.json          the drift reference (moves on approval)

Calibration bytes are never overwritten: publishing again on a date adds a table under its own
digest and moves the date's pointer, so a version's calibration_uri keeps naming the bytes it was
made from (the fetch step checks them against the digest in the key). A date folder holding only
a calibration.parquet (the layout before digests) is still read.

A checkpoint folder without manifest.json is an upload in progress (or a crashed one): it is
skipped and logged, never picked. A download lands in a temporary sibling folder and is renamed
into place only after every file matched its sha256 in the manifest. The checkpoint's identity
(`checkpoint_sha256`) is the sha256 of its manifest, i.e. of all its files' hashes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import posixpath
import re
from pathlib import Path

from onerec.errors import UserError
from onerec.manifest import (
    MANIFEST,
    atomic_folder,
    manifest_digest,
    read_manifest,
    sha256_file,
    verify_manifest,
)
from tasks.config import PipelineConfig
from tasks.errors import StepFailed
from tasks.outages import s3_client_config

log = logging.getLogger(__name__)

MB = 1 << 20


def s3_client(cfg: PipelineConfig):
    """A boto3 S3 client for the configured endpoint, with the bounded retries of tasks.outages."""
    import boto3  # heavy: boto3

    return boto3.client("s3", config=s3_client_config(), **cfg.s3_client_kwargs())


def transfer_config():
    """Multipart transfers for large weight files (parts of 64 MiB, 8 in flight)."""
    from boto3.s3.transfer import TransferConfig  # heavy: boto3

    return TransferConfig(multipart_threshold=64 * MB, multipart_chunksize=64 * MB, max_concurrency=8)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise UserError(f"{uri}: expected an s3://BUCKET/KEY URI")
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise UserError(f"{uri}: no bucket")
    return bucket, key


def join_uri(prefix: str, *parts: str) -> str:
    return posixpath.join(prefix.rstrip("/"), *parts) if prefix else posixpath.join(*parts)


def _not_found(exc) -> bool:
    return getattr(exc, "response", {}).get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound")


def s3_exists(client, uri: str) -> bool:
    from botocore.exceptions import ClientError  # heavy: boto3

    bucket, key = parse_s3_uri(uri)
    try:
        client.head_object(Bucket=bucket, Key=key)
        return True
    except ClientError as exc:
        if _not_found(exc):
            return False
        raise


def read_json(client, uri: str) -> dict | None:
    """The JSON object at `uri`, or None when there is none."""
    from botocore.exceptions import ClientError  # heavy: boto3

    bucket, key = parse_s3_uri(uri)
    try:
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as exc:
        if _not_found(exc):
            return None
        raise
    return json.loads(body)


def write_json(client, uri: str, obj) -> None:
    bucket, key = parse_s3_uri(uri)
    client.put_object(Bucket=bucket, Key=key, Body=json.dumps(obj, indent=2, sort_keys=True).encode())


def list_prefixes(client, uri: str) -> list[str]:
    """The immediate 'sub-folder' names under an s3:// folder URI, sorted."""
    bucket, key = parse_s3_uri(uri)
    key = key.rstrip("/") + "/" if key else ""
    names = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key, Delimiter="/"):
        names += [p["Prefix"][len(key):].rstrip("/") for p in page.get("CommonPrefixes", [])]
    return sorted(names)


def upload_file(client, path: str | Path, uri: str) -> None:
    bucket, key = parse_s3_uri(uri)
    client.upload_file(str(path), bucket, key, Config=transfer_config())


def download_file(client, uri: str, path: str | Path) -> Path:
    bucket, key = parse_s3_uri(uri)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    client.download_file(bucket, key, str(path), Config=transfer_config())
    return path


def upload_folder(client, folder: str | Path, uri: str) -> list[str]:
    """Upload every file of a folder that holds a manifest: the files first, manifest.json LAST.

    A reader that sees the manifest therefore sees every file it lists.
    """
    folder = Path(folder)
    manifest = verify_manifest(folder)
    for name in sorted(manifest):
        upload_file(client, folder / name, join_uri(uri, name))
        log.info("uploaded %s (%d bytes)", join_uri(uri, name), manifest[name]["bytes"])
    upload_file(client, folder / MANIFEST, join_uri(uri, MANIFEST))
    return sorted(manifest) + [MANIFEST]


# --- the checkpoint contract --------------------------------------------------------------------------


def list_checkpoints(cfg: PipelineConfig, client=None) -> list[dict]:
    """Every checkpoint id under checkpoints/, oldest first, with whether its manifest exists."""
    client = client or s3_client(cfg)
    out = []
    for ckpt_id in list_prefixes(client, cfg.checkpoints_uri):
        uri = join_uri(cfg.checkpoints_uri, ckpt_id) + "/"
        out.append({"checkpoint_id": ckpt_id, "checkpoint_uri": uri, "complete": s3_exists(client, uri + MANIFEST)})
    return out


# --- inputs that failed validation: remembered per sha256, skipped by later runs ---------------------


def rejection_uri(cfg: PipelineConfig, kind: str, digest: str) -> str:
    """Where the rejection of a checkpoint (by its manifest's sha256) or calibration table (by its sha256) is kept."""
    return f"{cfg.s3_root}/rejected/{kind}/{digest}.json"


def record_rejection(cfg: PipelineConfig, kind: str, digest: str, uri: str, reason: str, client=None) -> None:
    """Remember that this `kind` ("checkpoint" or "calibration") failed validation: the find step skips
    it from now on (delete the record to try it again)."""
    write_json(client or s3_client(cfg), rejection_uri(cfg, kind, digest), {
        "kind": kind, "sha256": digest, "uri": uri, "reason": reason[:4000],
        "rejected_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")})
    log.warning("%s %s (sha256 %s) is recorded as rejected: later runs skip it", kind, uri, digest[:12])


def object_sha256(client, uri: str) -> str:
    bucket, key = parse_s3_uri(uri)
    digest = hashlib.sha256()
    for chunk in client.get_object(Bucket=bucket, Key=key)["Body"].iter_chunks(1 << 20):
        digest.update(chunk)
    return digest.hexdigest()


def find_latest_checkpoint(cfg: PipelineConfig, client=None) -> dict:
    """The newest (by sortable id) checkpoint whose manifest.json exists and that was not rejected
    before; incomplete ones are skipped, rejected ones too (and listed, for the alert).

    Returns {checkpoint_id, checkpoint_uri, skipped: [ids], rejected: [ids]}; UserError when there is none.
    """
    client = client or s3_client(cfg)
    skipped, rejected = [], []
    for ckpt_id in reversed(list_prefixes(client, cfg.checkpoints_uri)):
        uri = join_uri(cfg.checkpoints_uri, ckpt_id) + "/"
        if not s3_exists(client, uri + MANIFEST):
            log.warning("checkpoint %s has no %s yet (upload in progress or crashed): skipped", uri, MANIFEST)
            skipped.append(ckpt_id)
            continue
        if read_json(client, rejection_uri(cfg, "checkpoint", object_sha256(client, uri + MANIFEST))) is not None:
            log.warning("checkpoint %s failed validation before: skipped", uri)
            rejected.append(ckpt_id)
            continue
        return {"checkpoint_id": ckpt_id, "checkpoint_uri": uri, "skipped": skipped, "rejected": rejected}
    raise UserError(f"no complete checkpoint under {cfg.checkpoints_uri} (skipped incomplete: {skipped}; "
                    f"rejected before: {rejected})")


CALIBRATION_POINTER = "calibration.json"
DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
DIGEST_KEY = re.compile(r"/([0-9a-f]{64})\.parquet$")


def calibration_uri(cfg: PipelineConfig, date: str, sha256: str) -> str:
    """Where the calibration table with this digest, published on this date, lives (content-addressed)."""
    return f"{cfg.s3_root}/calibration/{date}/{sha256}.parquet"


def find_latest_calibration(cfg: PipelineConfig, client=None, rejected: list | None = None) -> str:
    """URI of the newest date's current calibration table (its pointer; else its calibration.parquet)
    that was not rejected before (the URIs of rejected newer ones are appended to `rejected`)."""
    client = client or s3_client(cfg)
    root = f"{cfg.s3_root}/calibration/"
    bucket, key = parse_s3_uri(f"{cfg.s3_root}/rejected/calibration/")
    any_rejected = client.list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1).get("KeyCount", 0) > 0
    for date in reversed([p for p in list_prefixes(client, root) if DATE.match(p)]):
        pointer = read_json(client, join_uri(root, date, CALIBRATION_POINTER))
        if pointer is not None:
            uri = pointer["calibration_uri"]
        else:
            uri = join_uri(root, date, "calibration.parquet")
            if not s3_exists(client, uri):
                continue
        if any_rejected and read_json(client, rejection_uri(cfg, "calibration", object_sha256(client, uri))):
            log.warning("calibration data %s failed validation before: skipped", uri)
            if rejected is not None:
                rejected.append(uri)
            continue
        return uri
    raise UserError(f"no calibration data under {root} (expected <date>/{CALIBRATION_POINTER}; publish it with "
                    f"`onerec-fp8 publish --calibration`; rejected before: {rejected or []})")


def _safe_relpath(name: str, uri: str) -> str:
    parts = Path(name).parts
    if Path(name).is_absolute() or ".." in parts or not parts:
        raise UserError(f"{uri}{MANIFEST}: refuses the path {name!r} (outside the checkpoint)")
    return name


def download_checkpoint(cfg: PipelineConfig, checkpoint_uri: str, dst: str | Path, client=None) -> dict:
    """Download a checkpoint into `dst`, verified file by file against its manifest.

    Files land in a temporary sibling of `dst` that is renamed into place only when every sha256
    matched; a mismatch raises UserError naming the file. A `dst` that already holds the same,
    intact checkpoint is reused. Returns {checkpoint_dir, checkpoint_sha256, files, reused}.
    """
    from botocore.exceptions import ClientError  # heavy: boto3

    client = client or s3_client(cfg)
    dst = Path(dst)
    uri = checkpoint_uri.rstrip("/") + "/"
    remote_manifest = read_json(client, uri + MANIFEST)
    if remote_manifest is None:
        raise UserError(f"{uri} has no {MANIFEST}: the checkpoint is incomplete")
    if (dst / MANIFEST).is_file() and json.loads((dst / MANIFEST).read_text()) == remote_manifest:
        try:
            verify_manifest(dst)
            log.info("%s already holds %s (verified): reused", dst, uri)
            return {"checkpoint_dir": str(dst), "checkpoint_sha256": manifest_digest(dst),
                    "files": len(remote_manifest), "reused": True}
        except UserError as exc:
            log.warning("local copy %s is damaged (%s): downloading again", dst, exc)
    with atomic_folder(dst, overwrite=True) as tmp:
        download_file(client, uri + MANIFEST, tmp / MANIFEST)
        manifest = read_manifest(tmp)
        for name, entry in sorted(manifest.items()):
            path = tmp / _safe_relpath(name, uri)
            try:
                download_file(client, uri + name, path)
            except ClientError as exc:
                if _not_found(exc):
                    raise StepFailed(f"{uri}{name}: listed in {MANIFEST} but missing from S3 "
                                     "(the checkpoint is damaged; publish it again)") from None
                raise
            if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
                raise UserError(f"{uri}{name}: sha256/size does not match the manifest (corrupted or altered upload)")
            log.info("downloaded and verified %s%s (%d bytes)", uri, name, entry["bytes"])
    return {"checkpoint_dir": str(dst), "checkpoint_sha256": manifest_digest(dst), "files": len(manifest),
            "reused": False}


def download_calibration(cfg: PipelineConfig, calibration_uri: str, dst: str | Path, client=None) -> dict:
    """Download the calibration table; returns {calibration_path, calibration_sha256}. A table under a
    digest key must have that digest (StepFailed otherwise: the bytes were altered after publishing)."""
    client = client or s3_client(cfg)
    path = download_file(client, calibration_uri, dst)
    digest = sha256_file(path)
    named = DIGEST_KEY.search(calibration_uri)
    if named and named.group(1) != digest:
        Path(path).unlink()
        raise StepFailed(f"{calibration_uri}: its content has sha256 {digest[:12]}..., not the digest its key names "
                         "(altered after publishing; publish the table again)")
    return {"calibration_path": str(path), "calibration_sha256": digest}
