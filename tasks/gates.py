"""The gate steps: FP8 vs bf16 quality (onerec.quant.quality_gate) and latency (onerec.engine.latency_gate).

Each gate runs through its command module's own entry point (`add_arguments` + `main`), i.e.
exactly what `onerec-fp8 gate quality|latency ...` runs, and its result JSON is kept in the
run's report folder. Whether a latency gate that could not measure (no FP8 GPU) blocks is the
pipeline's decision (PipelineConfig.latency_gate_blocking, applied in tasks.registry.gates_passed).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import shlex
from pathlib import Path

from onerec.errors import UserError

log = logging.getLogger(__name__)


def run_command(module_name: str, argv: list[str]) -> dict:
    """Run an `onerec-fp8` command module in-process; returns its result dict."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"{module_name} is not available ({exc})") from None
    parser = argparse.ArgumentParser(prog=module_name)
    module.add_arguments(parser)
    args = parser.parse_args(argv)
    args.verbose = False
    return module.main(args) or {}


def _keep(result: dict, report_dir: str | Path, name: str) -> dict:
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / f"{name}.json").write_text(json.dumps(result, indent=2, sort_keys=True, default=str))
    return result


def quality_gate_step(cfg, checkpoint_dir: str, quantized_dir: str, eval_data_dir: str, report_dir: str) -> dict:
    """FP8 vs bf16 on the held-out calibration requests (as a data folder); `passed` and every figure."""
    argv = ["--checkpoint", checkpoint_dir, "--quantized", quantized_dir, "--data", eval_data_dir,
            "--report-dir", str(Path(report_dir) / "quality_gate"), *shlex.split(cfg.quality_gate_args)]
    result = run_command("onerec.quant.quality_gate", argv)
    log.info("quality gate: %s (%s)", result.get("verdict", "passed" if result.get("passed") else "failed"),
             result.get("reason", ""))
    return _keep(result, report_dir, "quality_gate")


def latency_gate_step(cfg, checkpoint_dir: str, quantized_dir: str, report_dir: str) -> dict:
    """FP8 vs bf16 latency on this machine's GPU; `measurable` is False without an FP8 GPU."""
    argv = ["--checkpoint", checkpoint_dir, "--quantized", quantized_dir,
            "--report-dir", str(Path(report_dir) / "latency_gate"), *shlex.split(cfg.latency_gate_args)]
    if importlib.util.find_spec("onerec.engine.latency_gate") is None:
        # no engine in this install: nothing can be measured, which blocks unless configured not to
        result = {"gate": "latency", "measurable": False, "passed": None,
                  "reason": "onerec.engine.latency_gate is not installed"}
    else:
        result = run_command("onerec.engine.latency_gate", argv)
    if result.get("measurable") is False:
        log.warning("latency gate could not measure (%s); blocking: %s", result.get("reason"), cfg.latency_gate_blocking)
    else:
        log.info("latency gate: %s", "passed" if result.get("passed") else "FAILED")
    return _keep(result, report_dir, "latency_gate")
