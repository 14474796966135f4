"""The registration step: the run, and the challenger version when the gates passed (conventions in
mlflow_config/registry.md).

- registered model `onerec-v2-fp8` (PipelineConfig.model_name); one MLflow run per pipeline
  run in experiment `onerec-fp8-pipeline`, with params (checkpoint URI + sha256, recipe,
  calibration URI + sha256, the resolved config), every gate figure as a metric, and the
  reports (gate JSON, plots, distribution analysis, Data Docs) as artifacts under reports/, which
  is the run's own folder in the artifact store (a later run, same date or not, writes its own),
  with reports/manifest.json (each file's sha256) and the run tag reports_sha256 (the manifest's);
- gates passed: a model version (pyfunc from tasks/pyfunc_model.py, the quantized folder as
  artifact "quantized", the onerec library in code/ and only published requirements: pyfunc_model)
  tagged checkpoint_uri, checkpoint_sha256, calibration_sha256, recipe,
  gates=passed (or passed-latency-unmeasured), approval=pending, the signed `provenance`
  (tasks.provenance), a state record `pending` (tasks.approval), the reviewer's description
  (tasks.review_page) and alias `challenger`;
- gates failed: the run with its reports for forensics, no model version;
- idempotent and exclusive: a version with the same checkpoint_sha256 + recipe is never
  registered twice, also by runs racing outside the scheduler (tasks/registration_claim.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
from importlib.metadata import requires
from pathlib import Path

import onerec
from onerec.manifest import MANIFEST, sha256_file, write_manifest
from tasks import approval, provenance
from tasks.approval import read_record
from tasks.config import config_sha256
from tasks.errors import StateError
from tasks.gates import Gates
from tasks.registration_claim import abandoned_registration, registration_lock, settle_duplicates
from tasks.registry import CHALLENGER, EXPERIMENT, PYFUNC_CODE, client, filter_value, find_versions
from tasks.review_page import run_url, version_description

log = logging.getLogger(__name__)


# gate verdicts that depend only on the inputs (checkpoint, recipe, calibration data): not re-run
REMEMBERED_VERDICTS = ("failed", "inconclusive")


def find_existing(cfg, checkpoint_sha256: str, recipe: str, calibration_sha256: str | None = None,
                  mlflow_client=None) -> dict | None:
    """What an earlier run already did for this checkpoint + recipe, or None.

    {"status": "registered", "version": ...} when a version exists (nothing will be registered),
    {"status": "failed" | "inconclusive", "run_id": ...} when a finished run with the same calibration
    got that verdict from its gates: the same inputs would get it again (publish new data, more of
    it, or a new checkpoint). A latency gate that could not measure (`unmeasured`: the run landed
    where there is no FP8 GPU) is not remembered: the next run tries again. A version whose run
    died halfway through registering it (`abandoned_registration`) does not count.
    """
    c = mlflow_client or client(cfg)

    versions = [v for v in find_versions(cfg, c, checkpoint_sha256=checkpoint_sha256, recipe=recipe)
                if abandoned_registration(cfg, c, v) is None]
    if versions:
        v = versions[0]
        return {"status": "registered", "version": v.version}
    if calibration_sha256:
        exp = c.get_experiment_by_name(EXPERIMENT)
        if exp is not None:
            same_inputs = (f"tags.checkpoint_sha256 = {filter_value(checkpoint_sha256)} and tags.recipe = {filter_value(recipe)} "
                           f"and tags.calibration_sha256 = {filter_value(calibration_sha256)} and "
                           f"tags.model_name = {filter_value(cfg.model_name)}")
            for verdict in REMEMBERED_VERDICTS:
                runs = c.search_runs([exp.experiment_id], f"{same_inputs} and tags.gates = '{verdict}'", max_results=1)
                if runs:
                    return {"status": verdict, "run_id": runs[0].info.run_id}
    return None


def _flat(values: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in values.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def register_candidate(
    cfg, *, checkpoint_uri: str, checkpoint_sha256: str, calibration_uri: str, calibration_sha256: str,
    quantized_dir: str, report_dir: str, gates: Gates, run_name: str | None = None,
) -> dict:
    """Log the run (params, metrics, reports) and, when the gates passed, register the challenger.

    Returns {registered, version, run_id, gates, reason}. Idempotent and exclusive on
    checkpoint_sha256 + recipe (tasks.registration_claim). The run's tag `registration` says how
    it ended (running -> registered | duplicate | gates_failed | failed); `gates` is set on the
    run only once the outcome is recorded, so a run that died halfway never reads gates=passed.
    """
    with registration_lock(cfg, checkpoint_sha256, cfg.recipe):
        c = client(cfg)
        for mv in find_versions(cfg, c, checkpoint_sha256=checkpoint_sha256, recipe=cfg.recipe):
            if why := abandoned_registration(cfg, c, mv):
                # only the run that created a version deletes it (before signing it): this one stays,
                # unsigned and never promotable, and the checkpoint is registered again
                log.warning("%s: it is never promotable; registering the checkpoint again", why)
        existing = find_existing(cfg, checkpoint_sha256, cfg.recipe, mlflow_client=c)
        if existing and existing["status"] == "registered":
            log.info("version %s already holds checkpoint %s with recipe %s: nothing registered",
                     existing["version"], checkpoint_sha256[:12], cfg.recipe)
            _restore_challenger(cfg, c, existing)
            return {"registered": False, "version": existing["version"], "run_id": None,
                    "reason": "already registered", "gates": "passed"}
        return _log_and_register(cfg, c, checkpoint_uri=checkpoint_uri, checkpoint_sha256=checkpoint_sha256,
                                 calibration_uri=calibration_uri, calibration_sha256=calibration_sha256,
                                 quantized_dir=quantized_dir, report_dir=report_dir, gates=gates,
                                 run_name=run_name)


def _restore_challenger(cfg, c, existing: dict) -> None:
    """A pending version without the challenger alias (its run died right after registering) gets it."""
    from mlflow.exceptions import MlflowException  # heavy: MLflow

    try:
        if (read_record(cfg, existing["version"], mlflow_client=c) or {}).get("state") != "pending":
            return
    except StateError:
        return
    try:
        c.get_model_version_by_alias(cfg.model_name, CHALLENGER)
    except MlflowException:
        c.set_registered_model_alias(cfg.model_name, CHALLENGER, existing["version"])
        log.info("version %s had no %s alias: set", existing["version"], CHALLENGER)


def _log_and_register(cfg, c, *, checkpoint_uri: str, checkpoint_sha256: str, calibration_uri: str,
                      calibration_sha256: str, quantized_dir: str, report_dir: str, gates: Gates,
                      run_name: str | None) -> dict:
    import mlflow  # heavy: MLflow

    outcome, reason = gates.outcome(cfg.latency_gate_blocking)
    passed = outcome == "passed"
    label = gates.label if passed else outcome  # passed | passed-latency-unmeasured | failed | inconclusive | unmeasured
    tags = {
        "checkpoint_uri": checkpoint_uri, "checkpoint_sha256": checkpoint_sha256,
        "calibration_uri": calibration_uri, "calibration_sha256": calibration_sha256,
        "recipe": cfg.recipe,
        # the configuration every step ran with (the GPU steps' results were checked equal to it)
        "config_sha256": config_sha256(cfg),
    }
    mlflow.set_experiment(EXPERIMENT)
    run = mlflow.start_run(run_name=run_name, tags={**tags, "model_name": cfg.model_name, "registration": "running"})
    run_id = run.info.run_id
    # the version once it exists, and once its state record is written: a version that exists but
    # is not complete is deleted again if registration stops
    version = complete = None
    try:
        mlflow.log_params({
            "checkpoint_uri": checkpoint_uri, "checkpoint_sha256": checkpoint_sha256, "recipe": cfg.recipe,
            "calibration_uri": calibration_uri, "calibration_sha256": calibration_sha256,
            **{f"config.{k}": v for k, v in _flat(cfg.to_dict()).items()},
        })
        mlflow.log_metrics(gates.metrics())
        # the exact bytes the provenance signs (promote re-reads them from the run)
        _, gates_sha256 = provenance.write_gates_report(gates, report_dir)
        # the report set by content: reports/manifest.json lists each file's sha256, the run's tag
        # reports_sha256 names the manifest (the run's artifact folder is never written again)
        write_manifest(report_dir)
        mlflow.set_tag("reports_sha256", sha256_file(Path(report_dir) / MANIFEST))
        mlflow.log_artifacts(report_dir, "reports")
        if not passed:
            # gates: failed | inconclusive | unmeasured (none of them is a pass)
            mlflow.set_tags({"gates": outcome, "registration": "gates_failed", "reason": reason[:5000]})
            mlflow.end_run()
            log.warning("%s: run %s logged with its reports, no model version", reason, run_id)
            return {"registered": False, "version": None, "run_id": run_id, "gates": outcome, "reason": reason,
                    "run_url": run_url(cfg.tracking_uri(), run.info.experiment_id, run_id)}
        description = version_description(cfg, gates, quantized_dir, run.info.experiment_id, run_id,
                                          cfg.tracking_uri())
        info = mlflow.pyfunc.log_model(name="model", **pyfunc_model(quantized_dir))
        version = mlflow.register_model(info.model_uri, cfg.model_name,
                                        tags={**tags, "gates": label, "approval": "pending"}).version
        winner = settle_duplicates(c, cfg, checkpoint_sha256, cfg.recipe, version)
        if winner != version:
            mlflow.set_tags({"gates": label, "registration": "duplicate", "registered_version": winner})
            mlflow.end_run()
            return {"registered": False, "version": winner, "run_id": run_id, "gates": label,
                    "reason": "already registered (concurrent run)"}
        # the winning version only: the reviewer's page, its signature and its approval record
        c.update_model_version(cfg.model_name, version, description=description)
        provenance.sign_version(cfg, c, version, run_id, quantized_dir, gates_sha256)
        approval.start(cfg, c, version, run_id)
        complete = version
        c.set_registered_model_alias(cfg.model_name, CHALLENGER, version)
        mlflow.set_tags({"gates": label, "registration": "registered", "registered_version": version})
        mlflow.end_run()
    except BaseException:
        # Best effort (the tracking server may be the thing that failed): the run says it failed,
        # and a version it created but did not finish goes (else the next run finds and removes it).
        with contextlib.suppress(Exception):
            c.set_tag(run_id, "registration", "failed")
        if version is not None and complete != version:
            with contextlib.suppress(Exception):
                c.delete_model_version(cfg.model_name, version)
                log.warning("deleted version %s: its registration stopped before its state record", version)
        with contextlib.suppress(Exception):
            mlflow.end_run("FAILED")  # leaves this process's active-run stack even when the call fails
        raise
    log.info("registered %s version %s as %s (approval=pending)", cfg.model_name, version, CHALLENGER)
    return {"registered": True, "version": version, "run_id": run_id, "gates": label,
            "model_uri": f"models:/{cfg.model_name}/{version}", "reason": "gates passed"}


DISTRIBUTION = "onerec-fp8"  # this package: not published, so the model carries the library itself


def pyfunc_model(quantized_dir: str | Path) -> dict:
    """The arguments of mlflow.pyfunc.log_model / save_model for the pyfunc of `quantized_dir`.

    The environment restores from what the model lists: the library the model code imports
    (onerec/) travels in the model's code/ folder, and the requirements are the library's own
    dependencies (this package's core requirements, each published on PyPI; MLflow adds its own
    pin). Nothing names this unpublished package. Explicit requirements: inferring them would load
    the model once more in a subprocess.
    """
    return {
        "python_model": str(PYFUNC_CODE), "artifacts": {"quantized": str(quantized_dir)},
        "signature": model_signature(quantized_dir),
        "code_paths": [str(Path(onerec.__file__).resolve().parent)],
        "pip_requirements": [r for r in requires(DISTRIBUTION) or [] if "extra ==" not in r],
    }


def model_signature(folder: str | Path):
    """Input: history (list of item ids) + the model's profile features [+ user_id]; params k, beam_size."""
    from mlflow.models import ModelSignature  # heavy: MLflow
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema  # heavy: MLflow
    from mlflow.types.schema import Array  # heavy: MLflow

    config = json.loads((Path(folder) / "config.json").read_text())
    inputs = Schema([
        ColSpec(DataType.long, "user_id", required=False),
        ColSpec(Array(DataType.long), "history"),
        *[ColSpec(DataType.double, f) for f in config.get("profile_features", [])],
        *[ColSpec(DataType.string, f) for f in config.get("categorical_features", {})],
    ])
    outputs = Schema([ColSpec(DataType.long, "user_id", required=False), ColSpec(Array(DataType.long), "items"),
                      ColSpec(Array(DataType.double), "scores")])
    params = ParamSchema([ParamSpec("k", DataType.long, 10), ParamSpec("beam_size", DataType.long, 64),
                          ParamSpec("batch_size", DataType.long, 256)])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)
