"""The latency gate's measurement path on CPU (the engine's torch reference path, `allow_cpu=True`).

A tiny checkpoint WITH profile features, its FP8 folder and a calibration table: the gate times
requests from the table and random requests (with the profile filled), rejects a table whose
profile columns differ and a quantized folder of another checkpoint with one-line errors, and
survives an out-of-memory batch size. Production without an FP8 GPU stays `measurable: false`
(tests/unit/test_engine.py). The numbers themselves mean nothing on CPU: only the path is checked.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from onerec.engine import latency_gate
from onerec.engine.latency_gate import LatencyGateConfig, measure_latency
from onerec.errors import UserError

PROFILE = ["age", "income_k"]
FAST = dict(beam_size=16, k=5, warmup=1, repeats=2)


def _model(seed: int):
    from onerec.model import OneRecV2, OneRecV2Config

    torch.manual_seed(seed)
    model = OneRecV2(OneRecV2Config.from_preset("tiny", profile_features=PROFILE))
    with torch.no_grad():  # trained-like: a zero user token / BOS would give all-zero FP8 rows
        torch.nn.init.normal_(model.context.user_token, std=0.02)
        torch.nn.init.normal_(model.bos, std=0.02)
        model.context.profile_mean.copy_(torch.tensor([35.0, 50.0]))
        model.context.profile_std.copy_(torch.tensor([10.0, 20.0]))
    return model.eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """checkpoint/, quantized/ (fp8_dynamic of it), other_checkpoint/, calibration.parquet."""
    from onerec.checkpoint import save_checkpoint
    from onerec.engine.timing import random_index
    from onerec.quant import quantize
    from onerec.quant.export import save_quantized

    root = tmp_path_factory.mktemp("latency_gate")
    model = _model(0)
    table, _ = random_index(300, model.cfg.codebook_size, model.cfg.n_levels, seed=0)
    save_checkpoint(model, table, root / "checkpoint")
    save_checkpoint(_model(1), table, root / "other_checkpoint")
    qmodel = copy.deepcopy(model).to(torch.bfloat16)
    report = quantize(qmodel, "fp8_dynamic", measure=False)
    save_quantized(qmodel, table, report, root / "quantized", source_checkpoint=root / "checkpoint")
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 80, 40)  # some beyond the tiny context (50): truncated like the server
    pd.DataFrame({
        "user_id": np.arange(40), "history": [rng.integers(0, 300, n).tolist() for n in lengths],
        "target": rng.integers(0, 300, 40), "age": rng.normal(35, 10, 40).astype("float32"),
        "income_k": rng.normal(50, 20, 40).astype("float32"),
    }).to_parquet(root / "calibration.parquet", index=False)
    return root


def _check_measured(result: dict, batches: list[int]) -> None:
    assert result["measurable"] is True and result["timed_on"].startswith("cpu")
    assert result["measured_batch_sizes"] == batches and result["largest_batch_that_fit"] == max(batches)
    assert result["out_of_memory"] is None
    for name in ("bf16", "fp8"):
        for b in batches:
            row = result["latency_ms"][name][b]
            assert row["p50_ms"] > 0 and row["tflops"] > 0 and row["mfu_vs_fp8_peak"] is None  # no peak on CPU
    assert result["fp8_engine_layers"] is True
    assert isinstance(result["passed"], bool) and result["latency_ratio"] > 0 and result["throughput_ratio"] > 0
    assert result["torch"] == torch.__version__ and result["duration_s"] > 0
    json.dumps(result)  # the report is JSON as it is


def test_gate_times_requests_from_the_calibration_table(folders):
    config = LatencyGateConfig(batch_sizes=(3, 1), **FAST)
    result = measure_latency(folders / "checkpoint", folders / "quantized", config,
                             requests_path=folders / "calibration.parquet", allow_cpu=True)
    _check_measured(result, [1, 3])
    from onerec.manifest import sha256_file

    assert result["requests"] == {"source": "table", "path": str(folders / "calibration.parquet"),
                                  "sha256": sha256_file(folders / "calibration.parquet")}
    for b in (1, 3):  # histories kept to the serving context, left-padded to the batch's longest
        assert 1 <= result["shapes"][b]["history_len"] <= 50
        assert result["shapes"][b]["mean_known_history"] <= result["shapes"][b]["history_len"]


def test_gate_times_random_requests_with_the_profile_filled(folders):
    # the model needs profile features: random requests used to come without them (a traceback)
    config = LatencyGateConfig(batch_sizes=(2,), **FAST)
    result = measure_latency(folders / "checkpoint", folders / "quantized", config, allow_cpu=True)
    _check_measured(result, [2])
    assert result["requests"] == {"source": "random"}
    assert result["shapes"][2] == {**result["shapes"][2], "history_len": 50, "padded": False}


def test_requests_are_encoded_like_the_server(folders):
    from onerec.checkpoint import load_checkpoint
    from onerec.semantic_ids import encode_histories

    model, table = load_checkpoint(folders / "checkpoint")
    requests = latency_gate.read_request_table(folders / "calibration.parquet", PROFILE)
    sids, mask, profile = latency_gate.make_requests(model, table, 50, 50, requests, seed=3)
    order = np.random.default_rng(3).permutation(len(requests))
    rows = requests.iloc[order[np.arange(50) % len(requests)]]  # 40 rows, drawn cyclically
    expected_sids, expected_mask, _ = encode_histories(rows["history"].tolist(), table, 50)
    assert torch.equal(sids, expected_sids) and torch.equal(mask, expected_mask)
    assert torch.equal(profile, torch.tensor(rows[PROFILE].to_numpy(np.float32)))


def _one_line_error(call) -> str:
    with pytest.raises(UserError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_profile_columns_that_differ_from_the_checkpoint_are_a_one_line_error(folders, tmp_path):
    table = pd.read_parquet(folders / "calibration.parquet").rename(columns={"income_k": "income"})
    table.to_parquet(tmp_path / "renamed.parquet", index=False)
    message = _one_line_error(lambda: measure_latency(
        folders / "checkpoint", folders / "quantized", LatencyGateConfig(**FAST),
        requests_path=tmp_path / "renamed.parquet", allow_cpu=True))
    assert "profile columns ['age', 'income']" in message and "['age', 'income_k']" in message


def test_quantized_folder_of_another_checkpoint_is_a_one_line_error(folders):
    message = _one_line_error(lambda: measure_latency(
        folders / "other_checkpoint", folders / "quantized", LatencyGateConfig(**FAST), allow_cpu=True))
    assert "another checkpoint" in message


def _out_of_memory_above(monkeypatch, largest: int) -> None:
    real = latency_gate.time_request

    def time_request(engine, sids, *args):
        if sids.shape[0] > largest:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(engine, sids, *args)

    monkeypatch.setattr(latency_gate, "time_request", time_request)


def test_out_of_memory_reports_the_largest_batch_that_fit(folders, monkeypatch, tmp_path):
    _out_of_memory_above(monkeypatch, 2)
    config = LatencyGateConfig(batch_sizes=(1, 2, 4, 8), **FAST)
    result = measure_latency(folders / "checkpoint", folders / "quantized", config,
                             requests_path=folders / "calibration.parquet", allow_cpu=True)
    assert result["measured_batch_sizes"] == [1, 2] and result["largest_batch_that_fit"] == 2
    assert result["out_of_memory"]["batch"] == 4 and "out of memory" in result["out_of_memory"]["error"]
    assert result["throughput_batch"] == 2 and isinstance(result["passed"], bool)
    assert latency_gate.plot(result, tmp_path / "oom.png").stat().st_size > 10_000


def test_out_of_memory_at_every_batch_fails_the_gate_without_a_traceback(folders, monkeypatch, tmp_path):
    _out_of_memory_above(monkeypatch, 0)
    result = measure_latency(folders / "checkpoint", folders / "quantized",
                             LatencyGateConfig(batch_sizes=(1, 8), **FAST), allow_cpu=True)
    assert result["measurable"] is True and result["passed"] is False
    assert result["measured_batch_sizes"] == [] and "out of memory at batch 1" in result["reason"]
    assert Path(latency_gate.plot(result, tmp_path / "oom.png")).is_file()


def test_quality_gate_rejects_another_checkpoint_with_the_same_check(folders, tmp_path):
    from onerec.quant.quality_gate import run_quality_gate

    pd.DataFrame({"user_id": [0, 0, 0], "item_id": [1, 2, 3], "timestamp": [0, 1, 2]}).to_parquet(
        tmp_path / "interactions.parquet", index=False)
    message = _one_line_error(lambda: run_quality_gate(folders / "other_checkpoint", folders / "quantized", tmp_path))
    assert "another checkpoint" in message
