"""`onerec-fp8 pipeline ...`: the pipeline's steps from the command line, the same functions the DAGs call.

    onerec-fp8 pipeline run      [--checkpoint-uri URI --calibration-uri URI]   every requantize step
    onerec-fp8 pipeline STEP     [...]   the requantize steps in order through STEP (tasks.requantize.STEPS:
                                         find, fetch, check_registered, validate, quantize, quality_gate,
                                         latency_gate, register)
    onerec-fp8 pipeline exec STEP --inputs JSON [--config JSON] [--xcom-file F]
                                         one step alone, its inputs the earlier steps' results by step name,
                                         e.g. {"fetch": {...}, "quantize": {...}} (what a GPU pod of the
                                         requantize DAG runs; the result also goes to F for Airflow's XCom)
    onerec-fp8 pipeline expire                     pending candidates past approval_max_age_hours
    onerec-fp8 pipeline promote  [--version V]     default: the newest approved, not deployed
    onerec-fp8 pipeline rollback --reason TEXT [--version V] [--by NAME]

Without --checkpoint-uri / --calibration-uri the newest complete ones are used; verified local
copies in the work folder are reused. Configuration: environment (README), `--set KEY=VALUE`.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
from pathlib import Path

from onerec.errors import UserError
from onerec.settings import env_name
from tasks import requantize
from tasks.approval import expire_stale
from tasks.config import PipelineConfig, load_config
from tasks.outages import outage_message  # heavy: botocore, requests (a GPU pod has neither)
from tasks.promote import promote, promote_newest_approved
from tasks.requantize import STEP
from tasks.rollback import rollback

COMMANDS = ("run", *STEP, "exec", "expire", "promote", "rollback")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("step", choices=COMMANDS, help="what to run")
    parser.add_argument("exec_step", nargs="?", choices=list(STEP), help="exec: the step")
    parser.add_argument("--inputs", help="exec: JSON object, earlier step name -> its result")
    parser.add_argument("--xcom-file", help="exec: also write the result JSON here")
    parser.add_argument("--config", help="the worker's effective configuration as a JSON object (a GPU pod of the "
                                         "requantize DAG gets it): it overrides the environment in every field")
    parser.add_argument("--checkpoint-uri", help="s3://.../checkpoints/<id>/ (default: the newest complete one)")
    parser.add_argument("--calibration-uri", help="s3://.../calibration/<date>/calibration.parquet (default: newest)")
    parser.add_argument("--version", help="promote/rollback: the registry version")
    parser.add_argument("--reason", help="rollback: why (recorded on the version)")
    parser.add_argument("--by", default=None, help="rollback: who (default: the current user)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field (JSON values allowed), e.g. latency_gate_blocking=false "
                             "or quality_gate='{\"max_users\": 256}'")


def _overrides(pairs: list[str]) -> dict:
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


def _json_object(option: str, text: str, what: str) -> dict:
    """The JSON object an option was given, or a one-line UserError."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{option} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise UserError(f"{option} must be a JSON object: {what}")
    return value


def config(args: argparse.Namespace) -> PipelineConfig:
    """The command's configuration: environment < --config (a pod: the worker's) < --set."""
    overrides = {} if args.config is None else _json_object("--config", args.config, "config field -> value")
    return load_config({**overrides, **_overrides(args.set)})


def _found(cfg, args) -> dict | None:
    """The find step's result when a checkpoint or calibration table is given (None: find the newest)."""
    if not (args.checkpoint_uri or args.calibration_uri):
        return None
    found = requantize.find_step(cfg)
    if args.checkpoint_uri:
        uri = args.checkpoint_uri.rstrip("/") + "/"
        found.update(checkpoint_uri=uri, checkpoint_id=uri.rstrip("/").rsplit("/", 1)[-1], skipped=[])
    if args.calibration_uri:
        found["calibration_uri"] = args.calibration_uri
    return found


def main(args: argparse.Namespace) -> dict | None:
    """The entry point: the configuration is built here, once, and handed to every step."""
    cfg = config(args)
    if args.step == "exec":  # a GPU pod: no boto3 there, and the steps it runs never touch S3
        return run(args, cfg)

    try:
        return run(args, cfg)
    except UserError:
        raise
    except Exception as exc:  # S3 or MLflow down, denied, or gone after the clients' retries
        message = outage_message(exc, cfg)
        if message is None:
            raise
        raise UserError(f"{message} (is the stack up? `onerec-fp8 stack status`)") from None


def exit_code(args: argparse.Namespace, result) -> int | None:
    """`exec` exits 0 once the step ran, whatever a gate decided: the verdict travels in the XCom
    and the register step records a failed gate's run (a failed pod would skip that). None: the
    CLI's usual rule (3 for a gate that said no, 4 for an inconclusive one)."""
    return 0 if args.step == "exec" else None


def _require_mounted_state_dir(cfg: PipelineConfig) -> None:
    """A GPU pod mounts the work volume at its ONEREC_STATE_DIR (the requantize DAG sets it from the
    DAG processor's environment); a worker configuration that names another folder (an Airflow
    Variable's state_dir) would read and write outside the volume, where the other steps never look."""
    mounted = os.environ.get(env_name("state_dir"))
    if mounted and Path(mounted).resolve() != Path(cfg.state_dir).resolve():
        raise UserError(f"exec: the configuration's state_dir {cfg.state_dir} is not this pod's work folder {mounted} "
                        f"({env_name('state_dir')}, where the work volume is mounted): set state_dir in the "
                        "environment of every Airflow component, not in the Airflow Variable")


def run(args: argparse.Namespace, cfg: PipelineConfig) -> dict | None:
    if args.step == "exec":
        if not args.exec_step or args.inputs is None:
            raise UserError("exec needs a step name and --inputs JSON")
        inputs = _json_object("--inputs", args.inputs, "earlier step name -> its result")
        _require_mounted_state_dir(cfg)
        result = requantize.exec_step(cfg, args.exec_step, inputs)
        if args.xcom_file:
            Path(args.xcom_file).parent.mkdir(parents=True, exist_ok=True)
            Path(args.xcom_file).write_text(json.dumps(result, default=str))
        return result
    if args.step == "expire":
        return expire_stale(cfg)
    if args.step == "promote":
        return promote(cfg, args.version) if args.version else promote_newest_approved(cfg)
    if args.step == "rollback":
        if not args.reason:
            raise UserError("rollback needs --reason")
        return rollback(cfg, args.reason, args.version, by=args.by or getpass.getuser())
    until = None if args.step == "run" else args.step
    return requantize.run_requantize(cfg, until=until, found=_found(cfg, args))
