"""The requantize pipeline as plain steps, in the one order that the DAG, the CLI and the runner use (STEPS).

    find -> fetch -> check_registered (already registered? stop) -> validate -> quantize
         -> quality_gate, latency_gate -> register

Each step is one function: the config, then the results of the steps it needs (`Step.inputs`,
typed: Fetched, Quantized; JSON dicts from XCom are accepted and checked), returning a
JSON-able dict (its XCom). The DAG task, `onerec-fp8 pipeline exec STEP --inputs JSON` (a GPU
pod) and the tests call these same functions. Files live in a per-checkpoint work folder,
<state_dir>/pipeline/<checkpoint_id>/:
    checkpoint/            the verified download
    calibration.parquet    the calibration table; split/ its calibrate / held-out halves
    quantized-<recipe>/    the quantized folder (with its own reports/)
    reports/               validation (Data Docs, PNG, JSON), <gate>.json + <gate>.png per gate
`run_requantize(cfg)` runs them all in order in this process.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from onerec.devices import resolve_device
from onerec.errors import UserError
from onerec.gate_verdict import GateVerdict
from onerec.settings import build
from tasks.checkpoints import (
    MANIFEST,
    download_calibration,
    download_checkpoint,
    find_latest_calibration,
    find_latest_checkpoint,
    object_sha256,
    read_json,
    record_rejection,
    s3_client,
    write_json,
)
from tasks.config import config_sha256
from tasks.errors import StepFailed
from tasks.gates import Gates, Validation
from tasks.notify import send_failure
from tasks.quantize import split_calibration
from tasks.register import find_existing, register_candidate
from tasks.reports import gate_report

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fetched:
    """The verified local copies of a checkpoint and its calibration table (the fetch step's result)."""

    checkpoint_id: str
    checkpoint_uri: str
    checkpoint_dir: str
    checkpoint_sha256: str
    calibration_uri: str
    calibration_path: str
    calibration_sha256: str
    work_dir: str
    report_dir: str
    skipped: list = field(default_factory=list)  # incomplete checkpoint uploads passed over
    rejected: list = field(default_factory=list)  # newer checkpoints passed over: they failed validation before
    rejected_calibration: list = field(default_factory=list)  # the same for calibration tables
    files: int = 0
    reused: bool = False


@dataclass(frozen=True)
class Quantized:
    """The quantized folder and the calibration split it was made from (the quantize step's result)."""

    quantized_dir: str
    recipe: str
    reused: bool
    calibrate_path: str
    eval_path: str  # the held-out users' requests: the quality gate scores them, the latency gate replays them
    eval_data_dir: str
    calibrate_rows: int
    eval_rows: int
    quantized_layers: int | None = None
    excluded_layers: int | None = None
    worst_layer: str | None = None
    worst_layer_sqnr_db: float | None = None
    seconds: float | None = None
    config_sha256: str | None = None  # the configuration it ran with (tasks.config.config_sha256)


def typed(cls, value):
    """`value` as `cls`: an instance as it is, a dict (an XCom, --inputs JSON) checked field by field."""
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise UserError(f"{cls.__name__}: expected a JSON object, not {type(value).__name__}")
    try:
        return build(cls, value, cls.__name__)
    except TypeError as exc:  # a required field is missing
        raise UserError(f"{cls.__name__}: {exc}") from None


def _work(cfg, checkpoint_id: str) -> Path:
    return cfg.work_dir / checkpoint_id


def find_step(cfg) -> dict:
    """The newest complete checkpoint and calibration table that did not fail validation before;
    skipping a rejected newer one alerts on-call (the run goes on with the newest good one)."""
    client = s3_client(cfg)
    found = find_latest_checkpoint(cfg, client)
    rejected_calibration: list[str] = []
    found["calibration_uri"] = find_latest_calibration(cfg, client, rejected_calibration)
    found["rejected_calibration"] = rejected_calibration
    log.info("newest complete checkpoint: %s; calibration: %s", found["checkpoint_uri"], found["calibration_uri"])
    if found["rejected"] or rejected_calibration:
        skipped = [f"checkpoint {c}" for c in found["rejected"]] + [f"calibration {u}" for u in rejected_calibration]
        send_failure(f"onerec_fp8_requantize: skipped newer input(s) that failed validation before ({cfg.s3_root})",
                     f"Skipped: {', '.join(skipped)}.\nUsing checkpoint {found['checkpoint_uri']} and calibration "
                     f"{found['calibration_uri']}.\nRecords: {cfg.s3_root}/rejected/ (delete one to try it again).", cfg)
    return found


def fetch_step(cfg, found: dict) -> dict:
    """Download and verify the checkpoint and the calibration table into the work folder; a
    checkpoint that does not verify is recorded as rejected (later runs skip it)."""
    client = s3_client(cfg)
    work = _work(cfg, found["checkpoint_id"])
    try:
        ckpt = download_checkpoint(cfg, found["checkpoint_uri"], work / "checkpoint", client)
    except UserError as exc:
        uri = found["checkpoint_uri"]
        record_rejection(cfg, "checkpoint", object_sha256(client, uri + MANIFEST), uri, str(exc), client)
        raise
    cal = download_calibration(cfg, found["calibration_uri"], work / "calibration.parquet", client)
    fetched = Fetched(**found, **ckpt, **cal, work_dir=str(work), report_dir=str(work / "reports"))
    return dataclasses.asdict(fetched)


def existing_step(cfg, fetched: Fetched | dict) -> dict | None:
    """What the registry already has for this checkpoint + recipe (None: go on)."""
    fetched = typed(Fetched, fetched)
    existing = find_existing(cfg, fetched.checkpoint_sha256, cfg.recipe, fetched.calibration_sha256)
    if existing:
        log.info("nothing to do for checkpoint %s with recipe %s: %s", fetched.checkpoint_sha256[:12],
                 cfg.recipe, existing)
    return existing


def validate_step(cfg, fetched: Fetched | dict) -> dict:
    """Great Expectations on the calibration table against the accepted reference profile on S3.

    A pass stores the table's profile under its digest; it becomes the drift reference only when a
    version made from it is approved (tasks.approval). A no raises StepFailed with the failures.
    """
    from tasks.validate import failure_summary, validate_calibration  # heavy: pandas, Great Expectations

    fetched = typed(Fetched, fetched)
    client = s3_client(cfg)
    reference = read_json(client, cfg.accepted_profile_uri)
    result = validate_calibration(cfg, fetched.calibration_path, fetched.checkpoint_dir,
                                  str(Path(fetched.report_dir) / "validation"), reference, fetched.calibration_sha256)
    if not result["passed"]:
        record_rejection(cfg, "calibration", fetched.calibration_sha256, fetched.calibration_uri,
                         failure_summary(result), client)
        raise StepFailed(
            f"calibration data {fetched.calibration_uri} failed validation; nothing is quantized or "
            f"registered. Failed expectations:\n{failure_summary(result)}\nData Docs: {result['data_docs']}"
        )
    profile_uri = cfg.calibration_profile_uri(fetched.calibration_sha256)
    write_json(client, profile_uri, json.loads(Path(result["profile"]).read_text()))
    log.info("stored the profile of this snapshot (the drift reference once a version made from it is "
             "approved): %s", profile_uri)
    return result


def quantize_step(cfg, fetched: Fetched | dict) -> dict:
    """Split the calibration table (calibrate / held out), then quantize with cfg.recipe (and
    cfg.layer_choice: "timed" times the layers on this pod's GPU)."""
    from onerec.quant.export import quantize_folder  # heavy: torch

    fetched = typed(Fetched, fetched)
    work = Path(fetched.work_dir)
    split = split_calibration(fetched.calibration_path, work / "split", cfg.quality_eval_requests)
    # calibrates on the GPU when there is one (a 1b checkpoint: about 50 s on an H200, minutes on CPU)
    options = {"layer_choice": cfg.layer_choice} if cfg.layer_choice != "all" else {}
    result = quantize_folder(fetched.checkpoint_dir, split["calibrate_path"], cfg.recipe,
                             work / f"quantized-{cfg.recipe}", options=options, overwrite=True, reuse=True,
                             device="auto")
    log.info("quantize: %s", "reused the folder of an earlier run" if result["reused"] else
             f"{result['quantized_layers']} layers in {result['seconds']} s")
    return dataclasses.asdict(Quantized(
        **split, quantized_dir=result["quantized"], recipe=result["recipe"], reused=result["reused"],
        quantized_layers=result.get("quantized_layers"),
        excluded_layers=len(result["excluded"]) if "excluded" in result else None,
        worst_layer=result.get("worst_layer"), worst_layer_sqnr_db=result.get("worst_layer_sqnr_db"),
        seconds=result.get("seconds"), config_sha256=config_sha256(cfg)))


def quality_gate_step(cfg, fetched: Fetched | dict, quantized: Quantized | dict) -> dict:
    """FP8 vs bf16 on the held-out calibration requests, on the GPU when there is one (cfg.quality_gate);
    writes reports/quality_gate.json (+ .png) and returns the GateVerdict's JSON."""
    from onerec.quant.quality_gate import run_quality_gate  # heavy: torch

    fetched, quantized = typed(Fetched, fetched), typed(Quantized, quantized)
    gate = dataclasses.replace(cfg.quality_gate, device=str(resolve_device(cfg.quality_gate.device)))
    started = time.monotonic()
    result = run_quality_gate(fetched.checkpoint_dir, quantized.quantized_dir, quantized.eval_data_dir, config=gate,
                              report_dir=fetched.report_dir)
    result["duration_s"] = round(time.monotonic() - started, 3)
    verdict = _verdict(cfg, gate_report(result, fetched.report_dir, "quality_gate"))
    # passed / failed / inconclusive (not a pass either: the register step says why it registers nothing)
    log.info("quality gate on %s: %s in %.1f s (%s)", verdict.device, verdict.outcome, verdict.duration_s,
             verdict.reason)
    return verdict.to_dict()


def _verdict(cfg, report: dict) -> GateVerdict:
    """The verdict of a gate's written report, with the configuration the gate ran with."""
    verdict = GateVerdict.of_report(report)
    return verdict.with_run(verdict.duration_s, config_sha256(cfg), report["report_json"])


def latency_gate_step(cfg, fetched: Fetched | dict, quantized: Quantized | dict) -> dict:
    """FP8 vs bf16 latency on this machine's GPU, replaying the run's held-out requests at
    cfg.latency_gate.batch_sizes; writes reports/latency_gate.json (+ .png) and returns the
    GateVerdict's JSON: `unmeasured` without an FP8 GPU (whether that blocks: cfg.latency_gate_blocking,
    applied in tasks.gates.Gates.outcome)."""
    from onerec.engine.latency_gate import measure_latency, plot  # heavy: torch

    fetched, quantized = typed(Fetched, fetched), typed(Quantized, quantized)
    started = time.monotonic()
    result = measure_latency(fetched.checkpoint_dir, quantized.quantized_dir, config=cfg.latency_gate,
                             requests_path=quantized.eval_path)
    result.setdefault("duration_s", round(time.monotonic() - started, 3))
    verdict = GateVerdict.of_report(result)
    if not verdict.measured:
        log.warning("latency gate could not measure (%s); blocking: %s", verdict.reason, cfg.latency_gate_blocking)
        return _verdict(cfg, gate_report(result, fetched.report_dir, "latency_gate")).to_dict()
    log.info("latency gate: %s (%s)", verdict.outcome, verdict.reason)
    return _verdict(cfg, gate_report(result, fetched.report_dir, "latency_gate", plot=plot)).to_dict()


def register_step(cfg, fetched: Fetched | dict, quantized: Quantized | dict, quality: GateVerdict | dict,
                  latency: GateVerdict | dict, validation: dict, run_name: str | None = None) -> dict:
    """Log the run with every report; a model version + alias challenger only when the gates passed
    (a failed or inconclusive quality gate: the run is tagged with the outcome and the reason)."""
    fetched, quantized = typed(Fetched, fetched), typed(Quantized, quantized)
    quality, latency = GateVerdict.from_dict(quality), GateVerdict.from_dict(latency)
    require_same_config(cfg, quantize=quantized.config_sha256, quality_gate=quality.config_sha256,
                        latency_gate=latency.config_sha256)
    report_dir = Path(fetched.report_dir)
    q_reports = Path(quantized.quantized_dir) / "reports"
    if q_reports.is_dir():  # the quantization/distribution reports, beside the gates' and GX's
        shutil.copytree(q_reports, report_dir / "quantization", dirs_exist_ok=True)
    gates = Gates(quality, latency, Validation(passed=validation.get("passed"), rows=validation.get("rows"),
                                               drift=validation.get("drift", {})))
    return register_candidate(
        cfg, checkpoint_uri=fetched.checkpoint_uri, checkpoint_sha256=fetched.checkpoint_sha256,
        calibration_uri=fetched.calibration_uri, calibration_sha256=fetched.calibration_sha256,
        quantized_dir=quantized.quantized_dir, report_dir=str(report_dir), gates=gates,
        run_name=run_name or f"requantize-{fetched.checkpoint_id}",
    )


def require_same_config(cfg, **step_configs: str | None) -> None:
    """The GPU steps (pods in the DAG's kubernetes mode) ran with this step's configuration: each
    result's config_sha256 equals ours, so the run's logged config (and tags) are what quantized
    and gated the model. A difference is a StepFailed naming the steps."""
    ours = config_sha256(cfg)
    differ = sorted(name for name, digest in step_configs.items() if digest != ours)
    if differ:
        raise StepFailed(f"step(s) {differ} ran with another configuration than the register step "
                         f"(config_sha256 {[step_configs[n] for n in differ]} != {ours}); nothing registered: "
                         "the pods must get the worker's --config")


def require_candidate(result: dict) -> dict:
    """The register step's result when it registered a version or found one; StepFailed otherwise.

    The DAG's register task ends with this, so a gate that failed, was inconclusive or could not
    measure fails the task (red in the Grid, on-call mailed) after its MLflow run holds the reports.
    """
    if result.get("registered") or result.get("version"):
        return result
    raise StepFailed(f"gates {result.get('gates')}: {result.get('reason')}; no version registered; "
                     f"reports: {result.get('run_url') or result.get('run_id')}")


@dataclass(frozen=True)
class Step:
    name: str  # the DAG's task id, the CLI's step name
    fn: Callable[..., dict | None]
    inputs: tuple[str, ...] = ()  # the earlier steps whose results it takes, in order
    after: tuple[str, ...] = ()  # earlier steps it waits for without taking their results
    gpu: bool = False  # a GPU step: a Kubernetes pod in the DAG's kubernetes mode
    retries: bool = True  # I/O steps retry; checks that can say no do not


STEPS: tuple[Step, ...] = (
    Step("find", find_step),
    Step("fetch", fetch_step, ("find",)),
    Step("check_registered", existing_step, ("fetch",), retries=False),
    Step("validate", validate_step, ("fetch",), after=("check_registered",), retries=False),
    Step("quantize", quantize_step, ("fetch",), after=("validate",), gpu=True, retries=False),
    Step("quality_gate", quality_gate_step, ("fetch", "quantize"), gpu=True, retries=False),
    Step("latency_gate", latency_gate_step, ("fetch", "quantize"), gpu=True, retries=False),
    Step("register", register_step, ("fetch", "quantize", "quality_gate", "latency_gate", "validate")),
)
STEP = {step.name: step for step in STEPS}


def pod_arguments(step: str, inputs: str, config: str, xcom_file: str = "/airflow/xcom/return.json") -> list[str]:
    """The arguments of `onerec-fp8` in a GPU pod of the requantize DAG (Kubernetes mode): `config`
    is the worker's effective configuration (tasks.config.config_json; the pod's environment gives
    only the secrets); the XCom sidecar reads /airflow/xcom/return.json. Tests and
    bench/gpu_pipeline_check.py run the same."""
    return ["pipeline", "exec", step, "--inputs", inputs, "--config", config, "--xcom-file", xcom_file]


def exec_step(cfg, name: str, inputs: dict) -> dict | None:
    """One step by name with its inputs given by step name (`pipeline exec`): {"fetch": {...}, ...}."""
    if name not in STEP:
        raise UserError(f"unknown step {name!r}; steps: {', '.join(STEP)}")
    step = STEP[name]
    missing = [i for i in step.inputs if i not in inputs]
    unknown = sorted(set(inputs) - set(step.inputs))
    if missing or unknown:
        raise UserError(f"step {name} takes the results of {list(step.inputs)} (missing {missing}, unknown {unknown})")
    return step.fn(cfg, *[inputs[i] for i in step.inputs])


def run_requantize(cfg, until: str | None = None, found: dict | None = None) -> dict:
    """The steps in order, in this process, through `until` (default: all; then it ends at registration).

    `found` replaces the find step's result (a given checkpoint/calibration). A full run stops after
    check_registered when the registry already has this checkpoint + recipe.
    """
    if until is not None and until not in STEP:
        raise UserError(f"unknown step {until!r}; steps: {', '.join(STEP)}")
    results: dict = {}
    for step in STEPS:
        if step.name == "find" and found is not None:
            results["find"] = found
            continue
        results[step.name] = step.fn(cfg, *[results[i] for i in step.inputs])
        if step.name == until:
            return results[step.name] or {}
        if step.name == "check_registered" and results[step.name] and until is None:
            return {"registered": False, "existing": results[step.name],
                    "checkpoint_sha256": results["fetch"]["checkpoint_sha256"]}
    return results["register"]
