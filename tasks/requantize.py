"""The requantize pipeline as plain steps: what dags/onerec_fp8_requantize.py wires together.

    find -> fetch -> (already registered? stop) -> validate -> quantize -> quality gate
         -> latency gate -> register

Each step takes the config and the previous steps' results (JSON-able dicts, i.e. XComs) and
returns one. Files live in a per-checkpoint work folder, <state_dir>/pipeline/<checkpoint_id>/:
    checkpoint/            the verified download
    calibration.parquet    the calibration table; split/ its calibrate / held-out halves
    quantized-<recipe>/    the quantized folder (with its own reports/)
    reports/               validation (Data Docs, PNG, JSON), gate JSONs and plots
`run_requantize(cfg)` runs them all in order (`onerec-fp8 pipeline run`, tests).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from onerec.errors import UserError

log = logging.getLogger(__name__)


class StepFailed(UserError):
    """A check that ran and said no (bad data, failed gate): retrying will not change the answer."""


def _work(cfg, checkpoint_id: str) -> Path:
    return cfg.work_dir / checkpoint_id


def find_step(cfg) -> dict:
    from tasks.checkpoints import find_latest_calibration, find_latest_checkpoint, s3_client

    client = s3_client(cfg)
    found = find_latest_checkpoint(cfg, client)
    found["calibration_uri"] = find_latest_calibration(cfg, client)
    log.info("newest complete checkpoint: %s; calibration: %s", found["checkpoint_uri"], found["calibration_uri"])
    return found


def fetch_step(cfg, found: dict) -> dict:
    """Download and verify the checkpoint and the calibration table into the work folder."""
    from tasks.checkpoints import download_calibration, download_checkpoint, s3_client

    client = s3_client(cfg)
    work = _work(cfg, found["checkpoint_id"])
    ckpt = download_checkpoint(cfg, found["checkpoint_uri"], work / "checkpoint", client)
    cal = download_calibration(cfg, found["calibration_uri"], work / "calibration.parquet", client)
    return {**found, **ckpt, **cal, "work_dir": str(work), "report_dir": str(work / "reports")}


def existing_step(cfg, fetched: dict) -> dict | None:
    """What the registry already has for this checkpoint + recipe (None: go on)."""
    from tasks.registry import find_existing

    existing = find_existing(cfg, fetched["checkpoint_sha256"], cfg.recipe, fetched["calibration_sha256"])
    if existing:
        log.info("nothing to do for checkpoint %s with recipe %s: %s", fetched["checkpoint_sha256"][:12],
                 cfg.recipe, existing)
    return existing


def validate_step(cfg, fetched: dict) -> dict:
    """Great Expectations on the calibration table; raises StepFailed (summary of the failures) on a no."""
    from tasks.validate import failure_summary
    from tasks.validate import validate_step as run_validation

    result = run_validation(cfg, fetched["calibration_path"], fetched["calibration_sha256"],
                           fetched["checkpoint_dir"], str(Path(fetched["report_dir"]) / "validation"))
    if not result["passed"]:
        raise StepFailed(
            f"calibration data {fetched['calibration_uri']} failed validation; nothing is quantized or "
            f"registered. Failed expectations:\n{failure_summary(result)}\nData Docs: {result['data_docs']}"
        )
    return result


def quantize_step(cfg, fetched: dict) -> dict:
    from tasks.quantize import quantize_step as run_quantize
    from tasks.quantize import split_calibration

    work = Path(fetched["work_dir"])
    split = split_calibration(fetched["calibration_path"], work / "split", cfg.quality_eval_requests)
    result = run_quantize(cfg, fetched["checkpoint_dir"], split["calibrate_path"], str(work / f"quantized-{cfg.recipe}"))
    return {**split, **result}


def quality_step(cfg, fetched: dict, quantized: dict) -> dict:
    from tasks.gates import quality_gate_step

    return quality_gate_step(cfg, fetched["checkpoint_dir"], quantized["quantized_dir"], quantized["eval_data_dir"],
                             fetched["report_dir"])


def latency_step(cfg, fetched: dict, quantized: dict) -> dict:
    from tasks.gates import latency_gate_step

    return latency_gate_step(cfg, fetched["checkpoint_dir"], quantized["quantized_dir"], fetched["report_dir"])


def register_step(cfg, fetched: dict, quantized: dict, quality: dict, latency: dict, validation: dict,
                  run_name: str | None = None) -> dict:
    """Log the run with every report; a model version + alias challenger only when the gates passed."""
    from tasks.registry import register_candidate

    report_dir = Path(fetched["report_dir"])
    q_reports = Path(quantized["quantized_dir"]) / "reports"
    if q_reports.is_dir():  # the quantization/distribution reports, beside the gates' and GX's
        shutil.copytree(q_reports, report_dir / "quantization", dirs_exist_ok=True)
    gates = {"quality": quality, "latency": latency,
             "validation": {"passed": validation.get("passed"), "rows": validation.get("rows"),
                            "drift": validation.get("drift", {})}}
    return register_candidate(
        cfg, checkpoint_uri=fetched["checkpoint_uri"], checkpoint_sha256=fetched["checkpoint_sha256"],
        calibration_uri=fetched["calibration_uri"], calibration_sha256=fetched["calibration_sha256"],
        quantized_dir=quantized["quantized_dir"], report_dir=str(report_dir), gates=gates,
        run_name=run_name or f"requantize-{fetched['checkpoint_id']}",
    )


def run_requantize(cfg) -> dict:
    """Every step in order, in this process (the DAG runs the same functions as separate tasks)."""
    fetched = fetch_step(cfg, find_step(cfg))
    existing = existing_step(cfg, fetched)
    if existing:
        return {"registered": False, "existing": existing, "checkpoint_sha256": fetched["checkpoint_sha256"]}
    validation = validate_step(cfg, fetched)
    quantized = quantize_step(cfg, fetched)
    quality = quality_step(cfg, fetched, quantized)
    latency = latency_step(cfg, fetched, quantized)
    return register_step(cfg, fetched, quantized, quality, latency, validation)
