"""bench/gpu_trained_overlap.py's measurement on CPU: the same function the GPU run calls, on the
trained tiny checkpoint quantized with fp8_dynamic, with every engine variant it compares and the
quality gate's recall interval beside the FP8 engine's overlap."""

from __future__ import annotations

import os

from bench.gpu_trained_overlap import trained_overlap


def test_trained_overlap_reports_each_variant_and_the_recall_interval(trained_tiny, tmp_path):
    from onerec.quant.export import quantize_folder

    folder = tmp_path / "trained"
    folder.mkdir()
    os.symlink(trained_tiny.checkpoint_dir, folder / "ckpt")
    os.symlink(trained_tiny.data_dir, folder / "data")
    quantize_folder(trained_tiny.checkpoint_dir, trained_tiny.calibration_path, "fp8_dynamic", folder / "quantized")
    result = trained_overlap(folder, [16], k=10, batch_size=128, device="cpu")
    row = result["by_beam"]["16"]
    assert result["users"] == len(trained_tiny.split.valid) and result["recipe"] == "fp8_dynamic"
    for name in ("bf16-eager", "fp8-eager", "bf16-engine", "fp8-engine"):
        assert 0 < row[f"recall@10_{name}"] <= 1, name
    # the engine runs the model's own search: bf16 engine = plain bf16 search on CPU
    assert row["overlap_bf16_engine_vs_bf16_eager"] == 1.0
    assert 0.8 <= row["overlap_fp8_engine_vs_bf16_engine"] <= 1.0
    change = row["recall@10_change_fp8-engine_vs_bf16_engine"]
    assert change["num_users"] == result["users"] and change["verdict"] in ("passed", "failed", "inconclusive")
    assert change["low"] <= change["estimate"] <= change["high"]
    assert result["overlap_fp8_engine_vs_bf16_engine_min"] == row["overlap_fp8_engine_vs_bf16_engine"]
