"""Quality gate and distribution analysis on the trained tiny model, and on an FP8-hostile twin of it.

The hostile twin (see make_fp8_hostile) computes exactly the same function in high precision,
but one input channel of blocks.1.ffn.w2 is 2^26 times larger than the others: with per-token
E4M3 scaling every other channel of that token falls below the smallest subnormal (2^-9 of 448,
~107 dB of range) and flushes to zero, and the compensating weight column falls below its
row's range too, so per-channel weight scales cannot help. Analyze must flag that layer and
only it; the gate must fail with default thresholds; --auto must recover by keeping exactly
that layer in bf16.
"""

import io
import json
from contextlib import redirect_stdout

import pytest
import torch

from onerec.checkpoint import load_checkpoint, save_checkpoint
from onerec.quant.analysis import analyze
from onerec.quant.calibrate import Calibration
from onerec.quant.export import load_quantized
from onerec.quant.export import quantize_folder as quantize_checkpoint

HOSTILE_LAYER = "blocks.1.ffn.w2"
HOSTILE_CHANNEL = 7
HOSTILE_FACTOR = 2.0**26  # a power of two: the scaling and its compensation are exact in fp32 and bf16


def _cli(argv):
    from onerec_fp8.cli import main

    out = io.StringIO()
    with redirect_stdout(out):
        code = main(argv)
    return code, json.loads(out.getvalue())


def make_fp8_hostile(checkpoint_dir, out):
    """Scale SwiGLU hidden channel c of block 1 up in w3 (so h_c = silu(w1 x)_c * (w3 x)_c grows) and
    the same column of w2 down: the block's output is unchanged, w2's input range is not."""
    model, table = load_checkpoint(checkpoint_dir)
    ffn = model.blocks[1].ffn
    with torch.no_grad():
        ffn.w3.weight[HOSTILE_CHANNEL] *= HOSTILE_FACTOR
        ffn.w2.weight[:, HOSTILE_CHANNEL] /= HOSTILE_FACTOR
    save_checkpoint(model, table, out)
    return out


@pytest.fixture(scope="module")
def hostile(trained_tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("quant_hostile")
    checkpoint = make_fp8_hostile(trained_tiny.checkpoint_dir, root / "checkpoint")
    quantized = root / "fp8"
    quantize_checkpoint(str(checkpoint), str(trained_tiny.calibration_path), "fp8_dynamic", str(quantized))
    return checkpoint, quantized, root


def test_fp8_dynamic_passes_the_default_quality_gate(trained_tiny, tmp_path):
    qdir = tmp_path / "fp8"
    quantize_checkpoint(str(trained_tiny.checkpoint_dir), str(trained_tiny.calibration_path), "fp8_dynamic", str(qdir))
    code, result = _cli(["gate", "quality", "--checkpoint", str(trained_tiny.checkpoint_dir), "--quantized", str(qdir),
                         "--data", str(trained_tiny.data_dir), "--report-dir", str(tmp_path / "gate")])
    assert code == 0 and result["passed"] is True, result
    assert result["config"]["max_relative_recall_drop"] == 0.05 and result["config"]["min_topk_overlap"] == 0.90
    assert result["num_users"] == len(trained_tiny.split.test)
    assert result["intervals"]["recall@10"]["low"] > -0.05 and result["top10_overlap"] >= 0.90
    assert result["bf16_recall@10"] > 0.2  # a trained model, so the comparison means something
    assert len(result["kl_per_level"]) == 3 and all(0 <= kl < 0.05 for kl in result["kl_per_level"])
    assert result["worst_layer_sqnr_db"] > 20 and result["worst_layer"] in result["layer_sqnr_db"]
    saved = json.loads((tmp_path / "gate" / "quality_gate.json").read_text())
    assert saved["passed"] is True and saved["top10_overlap"] == result["top10_overlap"]
    assert (tmp_path / "gate" / "quality_gate.png").stat().st_size > 10_000


def test_hostile_twin_is_the_same_model_in_high_precision(trained_tiny, hostile):
    checkpoint, _, _ = hostile
    base, table = load_checkpoint(trained_tiny.checkpoint_dir)
    twin, _ = load_checkpoint(checkpoint)
    batch = next(Calibration.from_path(trained_tiny.calibration_path, table).batches(base))
    with torch.no_grad():
        a = base(batch.history_sids, batch.history_mask, batch.target_sids, batch.profile)
        b = twin(batch.history_sids, batch.history_mask, batch.target_sids, batch.profile)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_analyze_flags_exactly_the_hostile_layer(trained_tiny, hostile, tmp_path):
    checkpoint, _, _ = hostile
    model, table = load_checkpoint(checkpoint)
    calibration = Calibration.from_path(trained_tiny.calibration_path, table, batch_size=128)
    result = analyze(model, calibration, "fp8_dynamic", out_dir=tmp_path / "analysis")
    assert set(result["flagged"]) == {HOSTILE_LAYER}
    reasons = " ".join(result["flagged"][HOSTILE_LAYER])
    assert "low_sqnr" in reasons and "token_underflow" in reasons
    layer = result["layers"][HOSTILE_LAYER]
    assert layer["sqnr_db"] < 10 and layer["activation"]["per_token_underflow_fraction"] > 0.5
    assert layer["activation"]["absmax_over_absp99"] > 1e4  # the outlier channel, seen in the statistics
    assert result["worst_layers"][0] == HOSTILE_LAYER and result["safe"] is False
    for png in result["plots"]:
        assert (tmp_path / "analysis" / png.split("/")[-1]).stat().st_size > 10_000
    # The control: the same analysis of the original model flags nothing.
    base, _ = load_checkpoint(trained_tiny.checkpoint_dir)
    control = analyze(base, calibration, "fp8_dynamic")
    assert control["flagged"] == {} and control["worst_layer_sqnr_db"] > 20


def test_gate_fails_on_the_hostile_model_and_auto_keeps_exactly_that_layer(trained_tiny, hostile):
    checkpoint, quantized, root = hostile
    argv = ["gate", "quality", "--checkpoint", str(checkpoint), "--quantized", str(quantized),
            "--data", str(trained_tiny.data_dir)]
    # The failure is gross: a sample of users shows it (exit code 3: a gate that ran and failed).
    code, failed = _cli([*argv, "--max-users", "200", "--report-dir", str(root / "gate")])
    assert code == 3 and failed["passed"] is False, failed
    assert failed["worst_layer"] == HOSTILE_LAYER and failed["worst_layer_sqnr_db"] < 10
    assert not (failed["checks"]["recall"] and failed["checks"]["topk_overlap"])
    code, fixed = _cli([*argv, "--auto", "--max-excluded", "3", "--out", str(root / "repaired"),
                        "--report-dir", str(root / "gate-auto")])
    assert code == 0 and fixed["passed"] is True, fixed
    assert fixed["auto"]["initial_passed"] is False and fixed["auto"]["initial"]["worst_layer"] == HOSTILE_LAYER and fixed["auto"]["kept_in_bf16"] == [HOSTILE_LAYER]
    assert fixed["auto"]["exclude_args"] == ["--exclude", HOSTILE_LAYER]
    assert fixed["top10_overlap"] >= 0.9 and fixed["worst_layer_sqnr_db"] > 20
    # The repaired folder loads on its own with that layer in bf16 and the reason recorded.
    model, _, recipe = load_quantized(root / "repaired")
    assert isinstance(model.get_submodule(HOSTILE_LAYER), torch.nn.Linear)
    assert model.get_submodule(HOSTILE_LAYER).weight.dtype == torch.bfloat16
    assert "auto" in recipe["excluded"][HOSTILE_LAYER] and HOSTILE_LAYER not in recipe["layers"]


def test_topk_overlap_and_thresholds_file(tmp_path):
    import numpy as np

    from onerec.errors import UserError
    from onerec.evaluate import topk_overlap
    from onerec.quant.quality_gate import QualityGateConfig

    a = np.array([[1, 2, 3, 4], [5, 6, -1, -1]])
    b = np.array([[4, 3, 9, 8], [5, 7, -1, -1]])
    assert topk_overlap(a, b, 4) == pytest.approx((2 / 4 + 1 / 4) / 2)  # padding (-1) never overlaps
    assert topk_overlap(a, a, 2) == 1.0
    path = tmp_path / "thresholds.json"
    path.write_text(json.dumps({"min_topk_overlap": 0.8, "max_kl": 0.1}))
    config = QualityGateConfig.load(path, max_users=50, beam_size=None)
    assert (config.min_topk_overlap, config.max_kl, config.max_users, config.beam_size) == (0.8, 0.1, 50, 64)
    assert config.max_relative_recall_drop == 0.05  # defaults stay for what the file leaves out
    path.write_text(json.dumps({"min_overlap": 0.8}))
    with pytest.raises(UserError, match="unknown keys"):
        QualityGateConfig.load(path)
