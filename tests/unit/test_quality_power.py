"""The quality gate decides on a data set of MovieLens-100K's shape (tests/fixtures/movielens_shape.py).

With one held-out position per user, 943 users leave the recall interval about +-5% wide: the
gate says inconclusive whatever FP8 does (tests/unit/test_gate_stats.py shows it on the numbers
measured on MovieLens). With the default positions per user the same users decide: the tiny
model's FP8 artifact passes with the default config, FP8 recommendations damaged to lose exactly
10% of the hits fail, and recommendations identical to bf16's pass.
"""

import io
import json
from contextlib import redirect_stdout

import numpy as np
import pytest


@pytest.fixture(scope="module")
def quantized(movielens_shape, tmp_path_factory):
    from onerec.quant.export import quantize_folder

    out = tmp_path_factory.mktemp("movielens_fp8") / "fp8"
    quantize_folder(str(movielens_shape.checkpoint_dir), str(movielens_shape.calibration_path), "fp8_dynamic", str(out))
    return out


def test_fp8_passes_with_the_default_config_on_943_users(movielens_shape, quantized, tmp_path):
    from onerec.quant.quality_gate import QualityGateConfig
    from onerec_fp8.cli import main

    out = io.StringIO()
    with redirect_stdout(out):
        code = main(["gate", "quality", "--checkpoint", str(movielens_shape.checkpoint_dir), "--quantized",
                     str(quantized), "--data", str(movielens_shape.data_dir), "--report-dir", str(tmp_path)])
    result = json.loads(out.getvalue())
    assert code == 0 and result["verdict"] == "passed", result["reason"]
    positions = QualityGateConfig().positions
    assert result["config"] == {**result["config"], "positions": positions, "max_users": None, "beam_size": 64}
    assert (result["num_users"], result["positions"], result["num_positions"]) == (943, positions, 943 * positions)
    assert result["bf16_recall@10"] > 0.2  # a trained model: the comparison means something
    recall = result["intervals"]["recall@10"]
    assert recall["num_users"] == 943 and -0.05 < recall["low"] <= recall["estimate"] <= recall["high"]
    # power, from the bf16 vs fp32 run before FP8 ran: these users and positions decide at the margin
    power = result["power"]["recall@10"]
    assert power["num_positions"] == 943 * positions
    assert power["min_detectable_change"] is None or (power["decides_at_margin"] and power["passes_above"] < -0.04)
    assert result["seconds"]["total"] >= result["seconds"]["fp8"] > 0
    assert json.loads((tmp_path / "quality_gate.json").read_text())["num_positions"] == 943 * positions


def test_a_known_10pct_recall_loss_fails_and_identical_recommendations_pass(movielens_shape):
    import torch

    from onerec.checkpoint import load_checkpoint
    from onerec.data import held_out_requests, load_dataset
    from onerec.quant.quality_gate import QualityComparison, QualityGateConfig

    config = QualityGateConfig(noise_floor=False)
    model, table = load_checkpoint(movielens_shape.checkpoint_dir, dtype=torch.bfloat16)
    requests = held_out_requests(load_dataset(movielens_shape.data_dir), "test", model.cfg.context_len,
                                 config.positions)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model's fastest (as the gate sets it)
    try:
        comparison = QualityComparison(model, table, requests, config)
    finally:
        torch.set_num_threads(threads)
    items, targets = comparison.bf16_items, comparison.targets
    hit_rows = np.flatnonzero((items[:, :10] == targets[:, None]).any(1))
    lost = np.random.default_rng(0).choice(hit_rows, round(0.10 * len(hit_rows)), replace=False)
    damaged = items.copy()
    damaged[lost] = np.where(damaged[lost] == targets[lost, None], -1, damaged[lost])  # exactly 10% of hits gone
    kl = [0.0, 0.0, 0.0]
    failed = comparison.judge(damaged, kl, {})
    assert failed["verdict"] == "failed" and failed["metric_verdicts"]["recall@10"] == "failed", failed["reason"]
    assert failed["relative_recall@10_change"] == pytest.approx(-0.10, abs=0.002)
    assert failed["intervals"]["recall@10"]["high"] < -0.05 and failed["top10_overlap"] >= 0.9  # the interval decides
    same = comparison.judge(items.copy(), kl, {})
    assert same["verdict"] == "passed" and same["intervals"]["recall@10"]["low"] == 0.0


def test_the_noise_floor_runs_on_a_sample_and_its_power_speaks_for_all_users(movielens_shape):
    """The fp32 pass (8.5x a bf16 pass on the H200) runs on `noise_floor_users` users; the power
    reported is for all users: the sample's interval half-width scaled by sqrt(sample / all)."""
    import torch

    from onerec.checkpoint import load_checkpoint
    from onerec.data import held_out_requests, load_dataset
    from onerec.quant.quality_gate import QualityComparison, QualityGateConfig

    config = QualityGateConfig(noise_floor_users=300)
    model, table = load_checkpoint(movielens_shape.checkpoint_dir, dtype=torch.bfloat16)
    fp32_model = load_checkpoint(movielens_shape.checkpoint_dir, dtype=torch.float32)[0]
    requests = held_out_requests(load_dataset(movielens_shape.data_dir), "test", model.cfg.context_len,
                                 config.positions)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        comparison = QualityComparison(model, table, requests, config, fp32_model)
        # TF32 is for CUDA only, and the caller's matmul precision comes back after the fp32 pass
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(previous)
    assert comparison.noise_floor["reference_matmuls"] == "ieee fp32"
    floor, power = comparison.noise_floor["recall@10"], comparison.power["recall@10"]
    assert floor["num_users"] == 300 and comparison.num_users == 943
    assert power["num_users"] == 943 and power["measured_users"] == 300
    if floor["low"] is not None and floor["discordant_users"]:
        measured_half_width = (floor["high"] - floor["low"]) / 2
        assert power["min_detectable_change"] == pytest.approx(measured_half_width * (300 / 943) ** 0.5)
    with pytest.raises(Exception, match="noise_floor_users"):
        QualityGateConfig(noise_floor_users=1)
