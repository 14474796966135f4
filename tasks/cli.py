"""`onerec-fp8 pipeline <step>`: each pipeline step from the command line, the same functions the DAGs call.

    onerec-fp8 pipeline find                       newest complete checkpoint + calibration data
    onerec-fp8 pipeline fetch    [--checkpoint-uri URI --calibration-uri URI]
    onerec-fp8 pipeline validate [...]             Great Expectations on the calibration data
    onerec-fp8 pipeline quantize [...]
    onerec-fp8 pipeline gates    [...]             quality + latency gates
    onerec-fp8 pipeline run      [...]             every requantize step, ends at registration
    onerec-fp8 pipeline expire                     pending candidates past approval_max_age_hours
    onerec-fp8 pipeline promote  [--version V]     default: the newest approved, not deployed
    onerec-fp8 pipeline rollback --reason TEXT [--version V] [--by NAME]

Steps after `find` take the checkpoint/calibration URIs (default: the newest) and reuse verified
local copies in the work folder. Configuration: environment (docs/runbook.md), `--set KEY=VALUE`.
"""

from __future__ import annotations

import argparse
import getpass
import json

STEPS = ("find", "fetch", "validate", "quantize", "gates", "run", "expire", "promote", "rollback", "exec")
# `exec STEP --inputs JSON`: one requantize step with its inputs given as JSON (a GPU pod of the
# requantize DAG runs this; the result also goes to --xcom-file for Airflow's XCom sidecar)
EXEC_STEPS = {"quantize": "quantize_step", "quality_gate": "quality_step", "latency_gate": "latency_step"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("step", choices=STEPS, help="the step to run")
    parser.add_argument("exec_step", nargs="?", choices=sorted(EXEC_STEPS), help="exec: the requantize step")
    parser.add_argument("--inputs", help="exec: JSON object of the step's inputs (previous steps' results)")
    parser.add_argument("--xcom-file", help="exec: also write the result JSON here")
    parser.add_argument("--checkpoint-uri", help="s3://.../checkpoints/<id>/ (default: the newest complete one)")
    parser.add_argument("--calibration-uri", help="s3://.../calibration/<date>/calibration.parquet (default: newest)")
    parser.add_argument("--version", help="promote/rollback: the registry version")
    parser.add_argument("--reason", help="rollback: why (recorded on the version)")
    parser.add_argument("--by", default=None, help="rollback: who (default: the current user)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a pipeline config field (JSON values allowed), e.g. latency_gate_blocking=false")


def _overrides(pairs: list[str]) -> dict:
    from onerec.errors import UserError

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise UserError(f"--set {pair!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _found(cfg, args) -> dict:
    from tasks import requantize

    found = requantize.find_step(cfg)
    if args.checkpoint_uri:
        uri = args.checkpoint_uri.rstrip("/") + "/"
        found.update(checkpoint_uri=uri, checkpoint_id=uri.rstrip("/").rsplit("/", 1)[-1], skipped=[])
    if args.calibration_uri:
        found["calibration_uri"] = args.calibration_uri
    return found


def main(args: argparse.Namespace) -> dict:
    from botocore.exceptions import BotoCoreError, ClientError

    from onerec.errors import UserError

    try:
        return run(args)
    except (BotoCoreError, ClientError) as exc:  # unreachable endpoint, no credentials, denied
        raise UserError(f"S3: {exc} (is the stack up, or are ONEREC_S3_* / AWS_* set?)") from None


def run(args: argparse.Namespace) -> dict:
    from onerec.errors import UserError
    from tasks import requantize
    from tasks.config import load_config

    cfg = load_config(_overrides(args.set))
    step = args.step
    if step == "find":
        return _found(cfg, args)
    if step == "exec":
        if not args.exec_step or not args.inputs:
            raise UserError("exec needs a step name and --inputs JSON")
        fn = getattr(requantize, EXEC_STEPS[args.exec_step])
        result = fn(cfg, **json.loads(args.inputs))
        if args.xcom_file:
            from pathlib import Path

            Path(args.xcom_file).parent.mkdir(parents=True, exist_ok=True)
            Path(args.xcom_file).write_text(json.dumps(result, default=str))
        return result
    if step == "expire":
        from tasks.approval import expire_stale

        return expire_stale(cfg)
    if step == "promote":
        from tasks.promote import promote, promote_newest_approved

        return promote(cfg, args.version) if args.version else promote_newest_approved(cfg)
    if step == "rollback":
        from tasks.rollback import rollback

        if not args.reason:
            raise UserError("rollback needs --reason")
        return rollback(cfg, args.reason, args.version, by=args.by or getpass.getuser())
    if step == "run" and not (args.checkpoint_uri or args.calibration_uri):
        return requantize.run_requantize(cfg)
    fetched = requantize.fetch_step(cfg, _found(cfg, args))
    if step == "fetch":
        return fetched
    if step == "validate":
        from tasks.validate import validate_step

        return validate_step(cfg, fetched["calibration_path"], fetched["calibration_sha256"],
                             fetched["checkpoint_dir"], str(cfg.work_dir / fetched["checkpoint_id"] / "reports" / "validation"))
    existing = requantize.existing_step(cfg, fetched)
    if step == "run" and existing:
        return {"registered": False, "existing": existing}
    validation = requantize.validate_step(cfg, fetched) if step == "run" else {}
    quantized = requantize.quantize_step(cfg, fetched)
    if step == "quantize":
        return quantized
    quality = requantize.quality_step(cfg, fetched, quantized)
    latency = requantize.latency_step(cfg, fetched, quantized)
    if step == "gates":
        from tasks.registry import gates_passed

        return {"passed": gates_passed({"quality": quality, "latency": latency}, cfg.latency_gate_blocking),
                "quality": quality, "latency": latency}
    return requantize.register_step(cfg, fetched, quantized, quality, latency, validation)
