"""Pipeline pieces without servers: config, the Great Expectations suites, gate logic, adapters."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from onerec.errors import UserError
from tasks.config import PipelineConfig

PROFILE = ["age", "activity"]


# --- config -------------------------------------------------------------------------------------------


def test_config_reads_contract_env_and_coerces_types():
    env = {"ONEREC_S3_BUCKET": "b", "ONEREC_S3_PREFIX": "/p/q/", "MLFLOW_TRACKING_URI": "http://m:1",
           "ONEREC_LATENCY_GATE_BLOCKING": "false", "ONEREC_APPROVAL_MAX_AGE_HOURS": "1.5",
           "ONEREC_MIN_CALIBRATION_ROWS": "7"}
    cfg = PipelineConfig.from_env(env)
    assert (cfg.s3_bucket, cfg.s3_prefix, cfg.mlflow_tracking_uri) == ("b", "p/q", "http://m:1")
    assert cfg.latency_gate_blocking is False and cfg.approval_max_age_hours == 1.5 and cfg.min_calibration_rows == 7
    assert cfg.checkpoints_uri == "s3://b/p/q/checkpoints/"
    # Airflow Variable overrides beat the environment
    assert PipelineConfig.from_env(env, {"latency_gate_blocking": True}).latency_gate_blocking is True


def test_config_rejects_bad_values():
    with pytest.raises(UserError, match="bool"):
        PipelineConfig.from_env({"ONEREC_LATENCY_GATE_BLOCKING": "maybe"})
    with pytest.raises(UserError, match="unknown config keys"):
        PipelineConfig.from_env({}, {"no_such_field": 1})
    with pytest.raises(UserError, match="rollout target"):
        PipelineConfig.from_env({"ONEREC_ROLLOUT_TARGET": "ftp"})


def test_gate_settings_are_typed_and_checked():
    env = {"ONEREC_QUALITY_GATE": '{"max_relative_recall_drop": 0.02, "max_users": 512}',
           "ONEREC_LATENCY_GATE": '{"batch_sizes": [1, 16]}'}
    cfg = PipelineConfig.from_env(env)
    assert cfg.quality_gate.max_relative_recall_drop == 0.02 and cfg.quality_gate.max_users == 512
    assert cfg.quality_gate.device == "auto"  # fields not given keep the pipeline's defaults
    assert cfg.latency_gate.batch_sizes == (1, 16)
    # the Airflow Variable (overrides) takes the same shape
    cfg = PipelineConfig.from_env({}, {"latency_gate": {"batch_sizes": [8]}, "quality_gate": {"device": "cpu"}})
    assert cfg.latency_gate.batch_sizes == (8,) and cfg.quality_gate.device == "cpu"
    # an unknown gate field is one line naming it (the old CLI-flag spelling included)
    for env, overrides in (({"ONEREC_QUALITY_GATE": '{"max_recall_drop": 0.02}'}, None),
                           ({}, {"latency_gate": {"batch": 8}})):
        with pytest.raises(UserError, match=r"unknown field\(s\) \['(max_recall_drop|batch)'\]") as err:
            PipelineConfig.from_env(env, overrides)
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="quality_gate"):
        PipelineConfig.from_env({"ONEREC_QUALITY_GATE": "--max-recall-drop 0.02"})  # not JSON
    with pytest.raises(UserError, match="unknown config keys"):
        PipelineConfig.from_env({}, {"quality_gate_args": "--max-users 32"})


def test_the_in_worker_steps_import_no_torch():
    """The Airflow image has no torch: the config, registry, promote and rollback modules must not need it."""
    import subprocess
    import sys

    code = ("import sys, tasks.config, tasks.registry, tasks.promote, tasks.rollback, tasks.approval, ops.rollout; "
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr[-2000:]


def test_every_secret_field_is_left_out_of_what_runs_log():
    from onerec.settings import secret_fields
    from tasks.config import PipelineConfig

    fields = secret_fields(PipelineConfig)
    assert set(fields) == {"aws_access_key_id", "aws_secret_access_key", "alert_webhook_url", "airflow_password"}
    cfg = PipelineConfig.from_env({}, {field: f"https://example.com/{field}-token" for field in fields})
    logged = json.dumps(cfg.to_dict(), default=str)
    for field in fields:
        assert getattr(cfg, field) == f"https://example.com/{field}-token"  # usable as a plain string
        assert field not in logged and f"{field}-token" not in logged and f"{field}-token" not in repr(cfg)


def test_settings_never_write_the_environment(tmp_path, monkeypatch):
    import os

    from onerec.settings import Settings

    (tmp_path / "stack.json").write_text(json.dumps({"env": {
        "ONEREC_S3_ENDPOINT_URL": "http://127.0.0.1:1", "AWS_ACCESS_KEY_ID": "key", "AWS_SECRET_ACCESS_KEY": "secret",
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:2"}}))
    for name in ("ONEREC_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ONEREC_STATE_DIR", str(tmp_path))
    before = dict(os.environ)
    settings = Settings.load()
    assert dict(os.environ) == before
    assert settings.s3_client_kwargs()["aws_secret_access_key"] == "secret"
    assert settings.tracking_uri() == "http://127.0.0.1:2"
    assert "secret" not in repr(settings) and "aws_secret_access_key" not in settings.to_dict()
    assert settings.subprocess_env({})["AWS_SECRET_ACCESS_KEY"] == "secret"


def test_the_mlflow_account_reaches_children_and_requests_without_the_environment(tmp_path, monkeypatch):
    import base64
    import os

    from mlflow.tracking.request_header.registry import resolve_request_headers

    from tasks.config import PipelineConfig
    from tasks.mlflow_headers import SERVICE_ACCOUNT
    from tasks.registry import use_service_account

    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "mlflow-service.json").write_text(json.dumps({"username": "svc", "password": "pw"}))
    cfg = PipelineConfig.from_env({}, {"state_dir": str(tmp_path)})
    env = cfg.subprocess_env({})
    assert (env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"]) == ("svc", "pw")
    assert cfg.subprocess_env({"MLFLOW_TRACKING_USERNAME": "other"})["MLFLOW_TRACKING_USERNAME"] == "other"
    before = dict(os.environ)
    try:
        use_service_account(cfg)
        assert dict(os.environ) == before
        assert resolve_request_headers()["Authorization"] == "Basic " + base64.b64encode(b"svc:pw").decode()
    finally:
        SERVICE_ACCOUNT.clear()
    assert "Authorization" not in resolve_request_headers()
    (secrets / "mlflow-service.json").write_text("not json")
    with pytest.raises(UserError, match="username and password"):
        cfg.mlflow_credentials()


# --- Great Expectations ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A small untrained checkpoint with profile features and one unknown item id (7)."""
    from onerec.checkpoint import save_checkpoint
    from onerec.model import OneRecV2, OneRecV2Config

    cfg = OneRecV2Config.from_preset("tiny", profile_features=PROFILE)
    rng = np.random.default_rng(0)
    codes = rng.permutation(64**3)[:300]
    table = np.stack([codes // 4096, (codes // 64) % 64, codes % 64], 1).astype(np.int32)
    table[7] = -1
    return save_checkpoint(OneRecV2(cfg), table, tmp_path_factory.mktemp("ckpt") / "ckpt")


def requests(n: int, seed: int, zipf: float = 1.0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    p = 1 / np.arange(1, 301) ** zipf
    p /= p.sum()
    rows = []
    for user in range(n):
        history = [int(i) for i in rng.choice(300, rng.integers(1, 40), p=p) if i != 7] or [1]
        target = int(rng.choice(300, p=p))
        rows.append((user, history, 8 if target == 7 else target, rng.normal(), rng.normal()))
    frame = pd.DataFrame(rows, columns=["user_id", "history", "target", *PROFILE])
    return frame.astype({f: "float32" for f in PROFILE})


def run_validation(tmp_path, checkpoint, frame: pd.DataFrame, reference=None, **overrides):
    from tasks.validate import validate_calibration

    path = tmp_path / f"cal-{len(list(tmp_path.iterdir()))}.parquet"
    frame.to_parquet(path)
    return validate_calibration(PipelineConfig(**overrides), path, checkpoint, tmp_path / "report", reference)


def test_good_calibration_passes_and_writes_reports(tmp_path, checkpoint):
    result = run_validation(tmp_path, checkpoint, requests(200, 1))
    assert result["passed"] and result["failed"] == []
    assert result["drift"]["checked"] is False  # first snapshot: nothing to compare with
    index = tmp_path / "report" / "data_docs" / "index.html"
    assert index.is_file() and "__none__" not in index.read_text()  # the GX run is named after the table
    assert (tmp_path / "report" / "calibration_validation.png").stat().st_size > 1000
    profile = json.loads((tmp_path / "report" / "calibration_profile.json").read_text())
    assert profile["rows"] == 200 and sum(profile["item_counts"].values()) == sum(map(len, requests(200, 1)["history"]))


def test_bad_calibration_names_every_failed_expectation(tmp_path, checkpoint):
    frame = requests(200, 2)
    frame.at[3, "history"] = [5, 99999]  # outside the semantic-id table
    frame.at[4, "history"] = [7]  # a known id range but unknown to the tokenizer
    frame.loc[5, "age"] = np.nan
    frame.loc[6, "activity"] = 1e6  # far outside the training statistics (mean 0, std 1)
    result = run_validation(tmp_path, checkpoint, frame)
    assert not result["passed"]
    failed = {(f["expectation"], f.get("column")) for f in result["failed"]}
    assert ("expect_column_values_to_be_between", "history_unknown_items") in failed
    assert ("expect_column_values_to_not_be_null", "age") in failed
    assert ("expect_column_values_to_be_between", "activity") in failed


def test_schema_and_row_count_failures(tmp_path, checkpoint):
    result = run_validation(tmp_path, checkpoint, requests(30, 3).drop(columns=["target"]), min_calibration_rows=64)
    names = {f["expectation"] for f in result["failed"]}
    assert {"required columns", "expect_table_row_count_to_be_between", "expect_column_to_exist"} <= names


def test_drift_against_the_accepted_snapshot(tmp_path, checkpoint):
    from tasks.validate import data_profile

    reference = data_profile(requests(400, 4))
    same = run_validation(tmp_path, checkpoint, requests(400, 5), reference)
    assert same["passed"] and same["drift"]["checked"]
    assert same["drift"]["popularity_kl"] < 0.1 and same["drift"]["history_length_kl"] < 0.1
    shifted = run_validation(tmp_path, checkpoint, requests(400, 6, zipf=0.0), reference)  # uniform popularity
    assert not shifted["passed"]
    assert shifted["drift"]["popularity_kl"] > 0.5
    assert [f["column"] for f in shifted["failed"]] == ["popularity_bucket"]


def test_data_docs_open_styled_with_no_network(tmp_path, checkpoint):
    """Every page (index, suites, both validations with their charts) loads nothing over http(s)
    and finds every file it references beside it; GX's own pages, unchanged, would not."""
    from tasks.data_docs import MARK, make_offline, offline_problems
    from tasks.validate import data_profile

    run_validation(tmp_path, checkpoint, requests(400, 5), data_profile(requests(400, 4)))
    docs = tmp_path / "report" / "data_docs"
    pages = sorted(docs.rglob("*.html"))
    assert len(pages) == 5 and offline_problems(docs) == []
    assert make_offline(docs) == 5 and offline_problems(docs) == []  # once only
    [drift_path] = [p for p in pages if p.name == "calibration_drift-calibration_drift.html"]
    drift_page = drift_path.read_text()
    assert drift_page.count(MARK) == 1 and "vegaEmbed(" in drift_page and "window.vegaEmbed" in drift_page
    assert "bootstrapTable(" in (docs / "index.html").read_text()  # built by the inline script

    gx_page = drift_page.replace(MARK, "").replace(
        "</head>", '<link rel="stylesheet" href="https://maxcdn.bootstrapcdn.com/bootstrap/4.3.1/css/bootstrap.min.css"/>'
                   '<script src="./static/scripts/gone.js"></script></head>')
    drift_path.write_text(gx_page)
    problems = offline_problems(docs)
    assert len(problems) == 3 and all(p.startswith(drift_path.relative_to(docs).as_posix()) for p in problems), problems


# --- gates, metrics, adapters -------------------------------------------------------------------------


def verdict(gate: str, outcome: str, reason: str = "", **fields):
    from onerec.gate_verdict import GateVerdict

    return GateVerdict(gate=gate, outcome=outcome, reason=reason, **fields)


def gates_of(quality, latency):
    from tasks.gates import Gates, Validation

    return Gates(quality, latency, Validation(passed=True, rows=10))


def test_gates_passed_policy():
    ok_quality = verdict("quality", "passed")
    measured_ok = verdict("latency", "passed")
    assert gates_of(ok_quality, measured_ok).passed(True)
    assert not gates_of(verdict("quality", "failed"), measured_ok).passed(False)
    assert not gates_of(ok_quality, verdict("latency", "failed")).passed(False)
    unmeasured = gates_of(ok_quality, verdict("latency", "unmeasured", "no CUDA"))
    assert not unmeasured.passed(latency_gate_blocking=True)  # production
    assert unmeasured.passed(latency_gate_blocking=False)  # the CPU demo


def test_a_gate_verdict_is_read_once_from_its_report_and_travels_as_versioned_json():
    from onerec.errors import UserError
    from onerec.gate_verdict import GateVerdict

    report = {"gate": "quality", "passed": False, "verdict": "inconclusive", "reason": "too few users",
              "users_needed": 900, "positions": 10, "config": {"device": "cpu", "beam_size": 8},
              "metric_verdicts": {"recall@10": "inconclusive"},
              "intervals": {"recall@10": {"estimate": -0.03, "low": -0.091, "high": 0.029, "margin": 0.05,
                                          "confidence": 0.95, "num_users": 40}}}
    quality = GateVerdict.of_report(report)
    assert (quality.outcome, quality.reason, quality.device, quality.positions) == (
        "inconclusive", "too few users", "cpu", 10)
    assert quality.intervals[0].metric == "recall@10" and quality.intervals[0].low == -0.091
    assert quality.figures["users_needed"] == 900 and "config.beam_size" not in quality.figures  # settings left out
    assert GateVerdict.from_dict(json.loads(json.dumps(quality.to_dict()))) == quality
    unmeasured = GateVerdict.of_report({"gate": "latency", "measurable": False, "reason": "no GPU", "passed": None})
    assert unmeasured.outcome == "unmeasured" and not unmeasured.measured and unmeasured.exit_code == 0
    with pytest.raises(UserError, match="schema version 0"):
        GateVerdict.from_dict({**quality.to_dict(), "schema_version": 0})
    with pytest.raises(UserError, match=r"unknown field\(s\) \['passed'\]"):
        GateVerdict.from_dict({**quality.to_dict(), "passed": True})
    with pytest.raises(UserError, match="outcome must be one of"):
        GateVerdict.from_dict({**quality.to_dict(), "outcome": "maybe"})


def test_an_inconclusive_quality_gate_registers_nothing_and_says_why(monkeypatch, capsys):
    """The registration step's decision (the Airflow run of it is the integration tests' job)."""
    import onerec.quant.quality_gate as quality_gate
    from onerec.gate_verdict import MetricInterval
    from onerec_fp8.cli import main

    latency = verdict("latency", "passed")
    reason = "inconclusive on 40 users: recall@10 -3.00% [-9.10%, +2.90%] (margin -5%); about 900 users would decide it"
    quality = verdict("quality", "inconclusive", reason, figures={"users_needed": 900.0, "intervals.recall@10.low": -0.091},
                      intervals=(MetricInterval("recall@10", "inconclusive", -0.03, -0.091, 0.029),))
    gates = gates_of(quality, latency)
    assert not gates.passed(latency_gate_blocking=False)
    assert gates.outcome(False) == ("inconclusive", f"quality gate inconclusive: {reason}")
    failed = gates_of(verdict("quality", "failed", "failed topk_overlap: ..."), latency)
    assert failed.outcome(False) == ("failed", "quality gate failed: failed topk_overlap: ...")
    unmeasured = gates_of(verdict("quality", "passed"), verdict("latency", "unmeasured", "no GPU"))
    assert unmeasured.outcome(True) == ("unmeasured", "latency gate could not measure (no GPU) and blocks")
    assert gates_of(verdict("quality", "passed"), latency).outcome(False)[0] == "passed"
    # the interval bounds become run metrics
    assert gates.metrics()["quality.intervals.recall_at_10.low"] == -0.091
    # the CLI: 3 = failed, 4 = inconclusive, so a script can tell them apart
    argv = ["gate", "quality", "--checkpoint", "c", "--quantized", "q", "--data", "d"]
    for outcome, code in (("inconclusive", 4), ("failed", 3), ("passed", 0)):
        monkeypatch.setattr(quality_gate, "run_quality_gate",
                            lambda *a, v=outcome, **k: {"gate": "quality", "passed": v == "passed", "verdict": v})
        assert main(argv) == code
        assert json.loads(capsys.readouterr().out)["verdict"] == outcome


def test_the_register_step_logs_an_inconclusive_gate_without_a_version(tmp_path, monkeypatch):
    """The pipeline's register step on a real (sqlite) MLflow: the run is kept with its reports,
    tagged with the outcome and the reason; no model version, no alias."""
    from mlflow import MlflowClient

    from tasks.config import config_sha256
    from tasks.requantize import register_step

    monkeypatch.chdir(tmp_path)  # the sqlite store keeps artifacts in ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = PipelineConfig.from_env({}, {"mlflow_tracking_uri": uri, "state_dir": str(tmp_path),
                                       "latency_gate_blocking": False})
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "quality_gate.json").write_text("{}")
    fetched = {"checkpoint_id": "c1", "checkpoint_uri": "s3://b/c1/", "checkpoint_dir": str(tmp_path / "ckpt"),
               "checkpoint_sha256": "a" * 64, "calibration_uri": "s3://b/cal.parquet",
               "calibration_path": str(tmp_path / "cal.parquet"), "calibration_sha256": "b" * 64,
               "work_dir": str(tmp_path), "report_dir": str(reports)}
    ran_with = {"config_sha256": config_sha256(cfg)}  # the GPU steps ran with the register step's config
    quantized = {"quantized_dir": str(tmp_path / "q"), "recipe": "fp8_dynamic", "reused": False,
                 "calibrate_path": "c", "eval_path": "e", "eval_data_dir": "d", "calibrate_rows": 1, "eval_rows": 1,
                 **ran_with}
    reason = "inconclusive on 40 users: recall@10 -3.00% [-9.10%, +2.90%] (margin -5%); about 900 users would decide it"
    quality = verdict("quality", "inconclusive", reason, figures={"users_needed": 900.0}, **ran_with).to_dict()
    no_gpu = verdict("latency", "unmeasured", "no GPU", **ran_with).to_dict()
    result = register_step(cfg, fetched, quantized, quality, no_gpu, {"passed": True, "rows": 10})
    assert result["registered"] is False and result["version"] is None and result["gates"] == "inconclusive"
    assert result["reason"] == f"quality gate inconclusive: {reason}"
    c = MlflowClient(uri, registry_uri=uri)  # this process may have set a registry URI for another server
    run = c.get_run(result["run_id"])
    assert run.data.tags["gates"] == "inconclusive" and run.data.tags["reason"] == result["reason"]
    assert run.data.tags["registration"] == "gates_failed" and run.info.status == "FINISHED"
    assert run.data.metrics["quality.users_needed"] == 900
    assert {a.path for a in c.list_artifacts(run.info.run_id, "reports")} >= {"reports/quality_gate.json"}
    assert c.search_model_versions(f"name='{cfg.model_name}'") == []
    # the same inputs are not gated again; a latency gate that could not measure is retried
    from tasks.register import find_existing

    existing = find_existing(cfg, "a" * 64, "fp8_dynamic", "b" * 64)
    assert existing == {"status": "inconclusive", "run_id": result["run_id"]}
    cfg = PipelineConfig.from_env({}, {"mlflow_tracking_uri": uri, "state_dir": str(tmp_path),
                                       "latency_gate_blocking": True})
    ran_with = {"config_sha256": config_sha256(cfg)}
    unmeasured = register_step(cfg, {**fetched, "checkpoint_sha256": "c" * 64}, {**quantized, **ran_with},
                               verdict("quality", "passed", **ran_with).to_dict(),
                               verdict("latency", "unmeasured", "no GPU", **ran_with).to_dict(),
                               {"passed": True, "rows": 10})
    assert unmeasured["registered"] is False and unmeasured["gates"] == "unmeasured"
    assert find_existing(cfg, "c" * 64, "fp8_dynamic", "b" * 64) is None


def test_gate_metrics_flatten_every_number():
    from onerec.gate_verdict import GateVerdict

    quality = GateVerdict.of_report({"gate": "quality", "verdict": "passed", "passed": True, "bf16_recall@10": 0.5,
                                     "kl_per_level": [1, 2], "recipe": "x", "nested": {"p50_ms": 3},
                                     "thresholds": {"max": 1}})
    latency = GateVerdict.of_report({"gate": "latency", "measurable": True, "passed": True, "ratio": float("nan")})
    assert gates_of(quality, latency).metrics() == {
        "quality.passed": 1.0, "quality.bf16_recall_at_10": 0.5, "quality.nested.p50_ms": 3.0,
        "latency.measurable": 1.0, "latency.passed": 1.0, "validation.passed": 1.0, "validation.rows": 10.0}


def test_requests_as_data_folder_has_those_requests_as_its_test_split(tmp_path):
    from onerec.data import load_dataset, split_leave_last_out
    from tasks.quantize import requests_as_data_folder

    frame = requests(50, 7)
    folder = requests_as_data_folder(frame, tmp_path / "data")
    test = split_leave_last_out(load_dataset(folder)).test
    kept = frame[frame["history"].map(len) >= 2].reset_index(drop=True)  # shorter ones have no test target
    assert len(test) == len(kept)
    assert test["history"].tolist() == kept["history"].tolist()
    assert test["target"].tolist() == kept["target"].tolist()
    assert np.allclose(test["age"].to_numpy(), kept["age"].to_numpy())


def test_calibration_split_holds_out_whole_users_and_the_gate_scores_their_last_positions(tmp_path):
    from onerec.data import load_dataset, split_leave_last_out
    from tasks.quantize import split_calibration

    frame = requests(80, 9)
    frame = pd.concat([frame, frame.assign(history=frame["history"].map(lambda h: h[:-1]))])  # 2 requests a user
    frame = frame[frame["history"].map(len) >= 3].sample(frac=1.0, random_state=0).reset_index(drop=True)
    frame.to_parquet(tmp_path / "calibration.parquet")
    split = split_calibration(tmp_path / "calibration.parquet", tmp_path / "split", eval_users=25)
    calibrate, held_out = pd.read_parquet(split["calibrate_path"]), pd.read_parquet(split["eval_path"])
    assert set(calibrate["user_id"]).isdisjoint(held_out["user_id"])  # no held-out user shaped the quantization
    assert len(held_out) == held_out["user_id"].nunique() == 25
    longest = frame.groupby("user_id")["history"].apply(lambda h: h.map(len).max())
    assert (held_out["history"].map(len).to_numpy() == longest[held_out["user_id"]].to_numpy()).all()
    test = split_leave_last_out(load_dataset(split["eval_data_dir"]), positions=3).test
    assert test["user_id"].nunique() == 25 and test.groupby("user_id").size().max() == 3
    last = test.groupby("user_id").tail(1).reset_index(drop=True)  # each user's last position: the request itself
    assert last["target"].tolist() == held_out["target"].tolist()
    assert last["history"].map(list).tolist() == held_out["history"].map(list).tolist()


def test_parse_s3_uri():
    from tasks.checkpoints import parse_s3_uri

    assert parse_s3_uri("s3://b/k/x.json") == ("b", "k/x.json")
    with pytest.raises(UserError):
        parse_s3_uri("http://b/k")


def test_approval_values_are_case_and_space_tolerant():
    from tasks.approval import normalize_decision

    assert [normalize_decision(v) for v in ("approved", "Approved ", " APPROVED", "rejected", "Pending")] == [
        "approved", "approved", "approved", "rejected", "pending"]
    assert [normalize_decision(v) for v in ("aproved", "yes", "", "approved!", None)] == [None] * 5


def test_gates_label_and_reviewer_description(tmp_path):
    from onerec.gate_verdict import MetricInterval
    from tasks.config import PipelineConfig
    from tasks.review_page import version_description

    figures = {"num_users": 32.0, "top10_overlap": 0.96, "relative_recall@10_change": -0.004}
    quality = verdict("quality", "passed", figures=figures)
    unmeasured = gates_of(quality, verdict("latency", "unmeasured", "no CUDA GPU is visible"))
    measured = gates_of(quality, verdict("latency", "passed", figures={"latency_ratio": 0.81, "throughput_ratio": 1.3},
                                         device="H100"))
    assert unmeasured.label == "passed-latency-unmeasured" and measured.label == "passed"
    (tmp_path / "recipe.json").write_text(json.dumps({"excluded": {"lm_head": "sensitive (SQNR 12 dB)"}}))
    cfg = PipelineConfig(latency_gate_blocking=False)
    text = version_description(cfg, unmeasured, tmp_path, "7", "run1", "http://mlflow")
    assert "NOT MEASURED (no CUDA GPU is visible)" in text and "top10_overlap 0.96" in text
    assert r"lm\_head (sensitive (SQNR 12 dB))" in text and "#/experiments/7/runs/run1" in text  # not emphasis
    assert "[quality plot](http://mlflow/#/experiments/7/runs/run1/artifacts/reports/quality_gate.png)" in text
    assert "Promote model" in text and "the pencil on the row `approval`" in text
    assert "p50 0.81, throughput 1.3 on H100" in version_description(cfg, measured, tmp_path, "7", "r", None)
    quality = verdict("quality", "passed", figures=figures, positions=10, intervals=(
        MetricInterval("ndcg@10", "inconclusive", margin=0.05, num_users=32),
        MetricInterval("recall@10", "passed", -0.004, -0.0213, 0.0131, 0.95, 0.05, 32)))
    measured = gates_of(quality, measured.latency)
    text = version_description(cfg, measured, tmp_path, "7", "r", None)
    assert ("  - recall@10: PASSED, -0.40% [-2.13%, +1.31%] (95% interval), margin -5%, on 32 users x 10 positions"
            in text.splitlines())
    assert "  - ndcg@10: INCONCLUSIVE, change n/a, margin -5%, on 32 users x 10 positions" in text.splitlines()


def test_provenance_signature_binds_every_field_and_the_key_stays_private(tmp_path):
    import os

    from tasks.config import PipelineConfig
    from tasks.errors import ProvenanceError
    from tasks.provenance import evidence, load_key, sign, verifies

    cfg = PipelineConfig(state_dir=str(tmp_path))
    with pytest.raises(ProvenanceError, match="no provenance key"):
        load_key(cfg)  # promote never creates one
    key = load_key(cfg, create=True)
    assert os.stat(tmp_path / "secrets" / "provenance.key").st_mode & 0o777 == 0o600
    record = evidence(model="m", version="3", run_id="r", version_sha256="d" * 64, model_manifest_sha256="a" * 64,
                      checkpoint_sha256="b" * 64,
                      recipe="fp8_dynamic", gates_report_sha256="c" * 64)
    signature = sign(key, "version", record)
    assert verifies(key, "version", record, signature)
    for field in record:
        assert not verifies(key, "version", {**record, field: "x"}, signature), field
    assert not verifies(key, "state", record, signature)  # a state record's signature is no version's
    assert not verifies(b"k" * 64, "version", record, signature)
    os.chmod(tmp_path / "secrets" / "provenance.key", 0o644)
    with pytest.raises(ProvenanceError, match="chmod 600"):
        load_key(cfg)


def test_a_rollback_version_out_of_the_registry_range_is_refused_before_any_call():
    """23 digits would reach MLflow as an overflow (500, retried); refused at once, one line, no client used."""
    from tasks.config import PipelineConfig
    from tasks.errors import StepFailed
    from tasks.rollback import rollback

    cfg = PipelineConfig.from_env({})
    for version in ("1" * 23, "0", str(2**31)):
        with pytest.raises(StepFailed, match=r"digits only, 1\.\.2147483647") as refused:
            rollback(cfg, "on-call test", version=version, mlflow_client=object())
        assert "\n" not in str(refused.value) and len(str(refused.value)) < 200


def test_failure_mail_names_dag_task_run_error_and_link():
    from tasks.notify import MAX_ERROR_CHARS, failure_message, one_line

    subject, body = failure_message("onerec_fp8_requantize", "manual__1", ValueError("gates failed: recall\nTraceback"),
                                    "http://airflow/dags/x/runs/manual__1/tasks/register", task_id="register")
    assert subject == "[onerec-fp8] onerec_fp8_requantize.register failed: gates failed: recall"
    assert body.splitlines()[:5] == ["DAG:   onerec_fp8_requantize", "Task:  register", "Run:   manual__1",
                                     "Error: gates failed: recall", "Log:   http://airflow/dags/x/runs/manual__1/tasks/register"]
    assert len(one_line("x" * 5000)) == MAX_ERROR_CHARS and one_line(RuntimeError()) == "RuntimeError"


def test_gates_that_did_not_pass_fail_the_register_task_with_the_runs_link():
    from tasks.errors import StepFailed
    from tasks.requantize import require_candidate

    registered = {"registered": True, "version": "3"}
    assert require_candidate(registered) is registered
    assert require_candidate({"registered": False, "version": "3", "reason": "already registered"})
    for outcome in ("failed", "inconclusive", "unmeasured"):
        with pytest.raises(StepFailed, match=f"gates {outcome}: why; no version registered; reports: http://mlflow/r"):
            require_candidate({"registered": False, "version": None, "gates": outcome, "reason": "why",
                               "run_url": "http://mlflow/r"})


def test_kept_layer_patterns_show_as_written_in_the_review():
    from tasks.review_page import markdown_text

    assert markdown_text("heads.* (pattern 'heads.*')") == r"heads.\* (pattern 'heads.\*')"
    assert markdown_text("blocks_0_mlp") == r"blocks\_0\_mlp"
