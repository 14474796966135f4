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
    with pytest.raises(UserError, match="unknown pipeline config keys"):
        PipelineConfig.from_env({}, {"no_such_field": 1})
    with pytest.raises(UserError, match="rollout_target"):
        PipelineConfig.from_env({"ONEREC_ROLLOUT_TARGET": "ftp"})


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
    assert (tmp_path / "report" / "data_docs" / "index.html").is_file()
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


# --- gates, metrics, adapters -------------------------------------------------------------------------


def test_gates_passed_policy():
    from tasks.registry import gates_passed

    ok_quality = {"passed": True}
    assert gates_passed({"quality": ok_quality, "latency": {"measurable": True, "passed": True}}, True)
    assert not gates_passed({"quality": {"passed": False}, "latency": {"measurable": True, "passed": True}}, False)
    assert not gates_passed({"quality": ok_quality, "latency": {"measurable": True, "passed": False}}, False)
    unmeasured = {"quality": ok_quality, "latency": {"measurable": False, "reason": "no CUDA"}}
    assert not gates_passed(unmeasured, latency_gate_blocking=True)  # production
    assert gates_passed(unmeasured, latency_gate_blocking=False)  # the CPU demo


def test_an_inconclusive_quality_gate_registers_nothing_and_says_why(monkeypatch, capsys):
    """The registration step's decision (the Airflow run of it is the integration tests' job)."""
    import onerec.quant.quality_gate as quality_gate
    from onerec.cli import main
    from tasks.registry import gate_metrics, gates_outcome, gates_passed

    latency = {"measurable": True, "passed": True}
    reason = "inconclusive on 40 users: recall@10 -3.00% [-9.10%, +2.90%] (margin -5%); about 900 users would decide it"
    quality = {"passed": False, "verdict": "inconclusive", "reason": reason, "users_needed": 900,
               "intervals": {"recall@10": {"estimate": -0.03, "low": -0.091, "high": 0.029}}}
    gates = {"quality": quality, "latency": latency}
    assert not gates_passed(gates, latency_gate_blocking=False)
    assert gates_outcome(gates, False) == ("inconclusive", f"quality gate inconclusive: {reason}")
    failed = {"quality": {"passed": False, "verdict": "failed", "reason": "failed topk_overlap: ..."}, "latency": latency}
    assert gates_outcome(failed, False) == ("failed", "quality gate failed: failed topk_overlap: ...")
    unmeasured = {"quality": {"passed": True, "verdict": "passed"}, "latency": {"measurable": False, "reason": "no GPU"}}
    assert gates_outcome(unmeasured, True) == ("failed", "latency gate could not measure (no GPU) and blocks")
    assert gates_outcome({"quality": {"passed": True, "verdict": "passed"}, "latency": latency}, False)[0] == "passed"
    # the interval bounds become run metrics
    assert gate_metrics(gates)["quality.intervals.recall_at_10.low"] == -0.091
    # the CLI: 3 = failed, 4 = inconclusive, so a script can tell them apart
    argv = ["gate", "quality", "--checkpoint", "c", "--quantized", "q", "--data", "d"]
    for verdict, code in (("inconclusive", 4), ("failed", 3), ("passed", 0)):
        monkeypatch.setattr(quality_gate, "run_quality_gate",
                            lambda *a, v=verdict, **k: {"passed": v == "passed", "verdict": v})
        assert main(argv) == code
        assert json.loads(capsys.readouterr().out)["verdict"] == verdict


def test_gate_metrics_flatten_every_number():
    from tasks.registry import gate_metrics

    m = gate_metrics({"quality": {"passed": True, "bf16_recall@10": 0.5, "kl_per_level": [1, 2], "recipe": "x",
                                  "nested": {"p50_ms": 3}}, "latency": {"ratio": float("nan")}})
    assert m == {"quality.passed": 1.0, "quality.bf16_recall_at_10": 0.5, "quality.nested.p50_ms": 3.0}


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


def test_parse_s3_uri():
    from tasks.checkpoints import parse_s3_uri

    assert parse_s3_uri("s3://b/k/x.json") == ("b", "k/x.json")
    with pytest.raises(UserError):
        parse_s3_uri("http://b/k")
