"""`onerec-fp8 publish`: what a training job calls to hand a checkpoint to the pipeline.

    onerec-fp8 publish --checkpoint CKPT --s3 s3://BUCKET/PREFIX \
        [--calibration FILE_OR_DATA_DIR --date YYYY-MM-DD] [--checkpoint-id ID]

Uploads the checkpoint's files to s3://BUCKET/PREFIX/checkpoints/<id>/ and its manifest.json
LAST (the pipeline never picks a checkpoint without one), and the calibration request table to
s3://BUCKET/PREFIX/calibration/<date>/<sha256>.parquet, then the date's pointer calibration.json
(a data folder as --calibration: the table is drawn from it as `onerec-fp8 data calibration`
does; tasks/checkpoints.py has the layout). A checkpoint identical (same
manifest) to the newest complete one is not uploaded again. When something new landed, it posts
the Airflow asset event `onerec_checkpoint_published` (ops.airflow_events), so requantization
starts now rather than at the daily run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import logging
import re
import tempfile
from pathlib import Path

from onerec.calibration_table import context_len_of, is_data_folder, read_calibration, write_calibration_table
from onerec.errors import UserError
from onerec.manifest import manifest_digest, read_manifest, sha256_file, verify_manifest
from ops.airflow_events import CHECKPOINT_PUBLISHED, notify
from tasks.checkpoints import (
    CALIBRATION_POINTER,
    calibration_uri,
    find_latest_checkpoint,
    join_uri,
    parse_s3_uri,
    read_json,
    s3_client,
    s3_exists,
    upload_file,
    upload_folder,
    write_json,
)
from tasks.config import load_config

log = logging.getLogger(__name__)

SORTABLE_ID = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._-]*$")


def new_checkpoint_id(now: dt.datetime | None = None) -> str:
    """A sortable id: UTC time to the second, e.g. 20260131T235959Z."""
    return (now or dt.datetime.now(dt.UTC)).strftime("%Y%m%dT%H%M%SZ")


def publish(
    cfg, checkpoint: str, calibration: str | None = None, date: str | None = None,
    checkpoint_id: str | None = None, client=None,
) -> dict:
    """Upload a checkpoint (manifest last) and optionally calibration data under cfg.s3_root, with
    cfg's S3 endpoint and credentials. Returns what was uploaded."""
    client = client or s3_client(cfg)
    verify_manifest(checkpoint)  # never publish a damaged folder
    digest = manifest_digest(checkpoint)
    result: dict = {"checkpoint_sha256": digest}

    latest = None
    with contextlib.suppress(UserError):  # nothing published yet
        latest = find_latest_checkpoint(cfg, client)
    remote = read_json(client, latest["checkpoint_uri"] + "manifest.json") if latest else None
    if latest and remote == read_manifest(checkpoint) and checkpoint_id in (None, latest["checkpoint_id"]):
        log.info("checkpoint already published as %s: not uploaded again", latest["checkpoint_uri"])
        result.update(checkpoint_id=latest["checkpoint_id"], checkpoint_uri=latest["checkpoint_uri"], uploaded=False)
    else:
        checkpoint_id = checkpoint_id or new_checkpoint_id()
        if not SORTABLE_ID.match(checkpoint_id):
            raise UserError(f"--checkpoint-id {checkpoint_id!r}: use letters, digits, '.', '_' or '-'")
        uri = join_uri(cfg.checkpoints_uri, checkpoint_id) + "/"
        files = upload_folder(client, checkpoint, uri)
        log.info("published %s (%d files, manifest last)", uri, len(files))
        result.update(checkpoint_id=checkpoint_id, checkpoint_uri=uri, uploaded=True, files=files)

    if calibration is not None:
        date = date or dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
        try:
            dt.date.fromisoformat(date)
        except ValueError:
            raise UserError(f"--date {date!r}: expected YYYY-MM-DD") from None
        with tempfile.TemporaryDirectory() as tmp:
            if is_data_folder(calibration):
                table, source = read_calibration(calibration, context_len_of(checkpoint))
                result["calibration_source"] = source
                calibration = str(write_calibration_table(table, Path(tmp) / "calibration.parquet"))
            # under its digest: never overwritten, so every version's calibration_uri keeps its bytes
            cal_sha256 = sha256_file(calibration)
            cal_uri = calibration_uri(cfg, date, cal_sha256)
            if not s3_exists(client, cal_uri):
                upload_file(client, calibration, cal_uri)
            write_json(client, f"{cfg.s3_root}/calibration/{date}/{CALIBRATION_POINTER}",
                       {"calibration_uri": cal_uri, "calibration_sha256": cal_sha256})
            log.info("published calibration data %s", cal_uri)
            result.update(calibration_uri=cal_uri, calibration_sha256=cal_sha256)
    if result.get("uploaded") or calibration is not None:
        event = notify(CHECKPOINT_PUBLISHED, {"checkpoint_uri": result["checkpoint_uri"],
                                              "checkpoint_sha256": digest}, cfg)
        result["airflow_event"] = event is not None
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="local checkpoint folder (with manifest.json)")
    parser.add_argument("--s3", required=True, metavar="s3://BUCKET/PREFIX", help="where the pipeline looks")
    parser.add_argument("--calibration", help="calibration request table (parquet), or a data folder to draw one from")
    parser.add_argument("--date", help="calibration date folder, YYYY-MM-DD (default: today, UTC)")
    parser.add_argument("--checkpoint-id", help="sortable checkpoint id (default: UTC time, e.g. 20260131T235959Z)")


def main(args: argparse.Namespace) -> dict:
    if args.calibration and not (Path(args.calibration).is_file() or is_data_folder(args.calibration)):
        raise UserError(f"--calibration {args.calibration} does not exist")

    bucket, prefix = parse_s3_uri(args.s3.rstrip("/"))
    cfg = load_config({"s3_bucket": bucket, "s3_prefix": prefix})  # the entry point's configuration
    return publish(cfg, args.checkpoint, args.calibration, args.date, args.checkpoint_id)
