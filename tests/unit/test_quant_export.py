"""The quantized artifact: CLI, contents, size, bit-exact round trip, tamper detection."""

import io
import json
import shutil
import struct
from contextlib import redirect_stdout

import numpy as np
import pytest
import torch

from onerec.checkpoint import load_checkpoint
from onerec.errors import UserError
from onerec.manifest import manifest_digest, verify_manifest
from onerec.quant.calibrate import Calibration
from onerec.quant.export import load_quantized, save_quantized
from onerec.quant.fp8 import E4M3, FP8Linear
from onerec.quant.recipes import make_recipe, quantize


def _cli(argv):
    from onerec_fp8.cli import main

    out = io.StringIO()
    with redirect_stdout(out):
        code = main(argv)
    return code, json.loads(out.getvalue()) if out.getvalue().strip() else None


@pytest.fixture(scope="module")
def quantized_dir(trained_tiny, tmp_path_factory):
    qdir = tmp_path_factory.mktemp("quant_export") / "q"
    code, result = _cli([
        "quantize", "--checkpoint", str(trained_tiny.checkpoint_dir), "--calibration", str(trained_tiny.calibration_path),
        "--recipe", "fp8_dynamic", "--out", str(qdir), "--exclude", "blocks.0.self_o",
    ])
    assert code == 0
    return qdir, result


def _safetensors_header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def test_quantize_command_writes_the_artifact(trained_tiny, quantized_dir):
    qdir, result = quantized_dir
    assert {p.name for p in qdir.iterdir()} == {
        "config.json", "recipe.json", "model.safetensors", "semantic_ids.npy", "reports", "manifest.json"
    }
    assert (qdir / "reports" / "quantization.png").stat().st_size > 10_000
    manifest = verify_manifest(qdir)
    assert "reports/quantization.json" in manifest and "recipe.json" in manifest
    recipe = json.loads((qdir / "recipe.json").read_text())
    assert recipe["recipe"]["name"] == "fp8_dynamic"
    assert recipe["excluded"]["blocks.0.self_o"] == "excluded by pattern 'blocks.0.self_o'"
    assert "heads.0" in recipe["excluded"]
    assert recipe["source_checkpoint"]["manifest_sha256"] == manifest_digest(trained_tiny.checkpoint_dir)
    assert recipe["layers"]["blocks.0.ffn.w1"] == {
        "shape": [256, 64], "weight": "per_channel", "activation": "per_token", "block": 128, "bias": False
    }
    assert recipe["calibration"]["num_requests"] == 256
    assert recipe["calibration"]["layers"]["context.proj"]["sqnr_db"] > 20
    assert result["excluded"] == recipe["excluded"] and result["quantized_layers"] == len(recipe["layers"]) == 14
    assert result["size_ratio_vs_bf16"] == recipe["size"]["ratio_vs_bf16"]


def test_size_is_at_most_055_of_bf16_for_the_quantized_layers(quantized_dir):
    qdir, result = quantized_dir
    header = _safetensors_header(qdir / "model.safetensors")
    recipe = json.loads((qdir / "recipe.json").read_text())
    fp8_bytes = bf16_bytes = 0
    for name, spec in recipe["layers"].items():
        weight = header[f"{name}.weight_fp8"]
        assert weight["dtype"] == "F8_E4M3" and weight["shape"] == spec["shape"]
        assert header[f"{name}.weight_scale"]["dtype"] == "F32" and header[f"{name}.weight_scale"]["shape"] == spec["shape"][:1]
        for key in (f"{name}.weight_fp8", f"{name}.weight_scale"):
            start, end = header[key]["data_offsets"]
            fp8_bytes += end - start
        bf16_bytes += 2 * spec["shape"][0] * spec["shape"][1]
    # Everything else is bf16 (high precision), e.g. the heads and embeddings.
    assert header["heads.0.weight"]["dtype"] == "BF16" and header["blocks.0.self_o.weight"]["dtype"] == "BF16"
    ratio = fp8_bytes / bf16_bytes
    assert ratio <= 0.55
    assert ratio == pytest.approx(result["size_ratio_vs_bf16"])


def test_load_round_trip_is_bit_exact(trained_tiny, tmp_path):
    model, table = load_checkpoint(trained_tiny.checkpoint_dir)
    calibration = Calibration.from_path(trained_tiny.calibration_path, table, batch_size=128, max_requests=64)
    report = quantize(model, make_recipe("fp8_static", observer="mse"), calibration)
    save_quantized(model, table, report, tmp_path / "q", source_checkpoint=trained_tiny.checkpoint_dir)
    loaded, loaded_table, recipe = load_quantized(tmp_path / "q")
    assert np.array_equal(loaded_table, table) and recipe["recipe"]["observer"] == "mse"
    model = model.to(torch.bfloat16)  # what is stored: FP8 layers as they are, the rest in bf16
    expected, got = model.state_dict(), loaded.state_dict()
    assert expected.keys() == got.keys()
    for key, t in expected.items():
        assert got[key].dtype == t.dtype, key
        if t.dtype == E4M3:
            assert torch.equal(got[key].view(torch.uint8), t.view(torch.uint8)), key
        else:
            assert torch.equal(got[key], t), key
    assert loaded.get_submodule("blocks.1.ffn.w2").input_scale.dtype == torch.float32
    assert isinstance(loaded.get_submodule("blocks.1.cross_q"), FP8Linear)
    batch = next(calibration.batches(model))
    with torch.no_grad():
        a = model(batch.history_sids, batch.history_mask, batch.target_sids, batch.profile)
        b = loaded(batch.history_sids, batch.history_mask, batch.target_sids, batch.profile)
    assert a.dtype == torch.bfloat16 and torch.equal(a, b)


def test_tampered_or_foreign_folders_are_refused(quantized_dir, trained_tiny, tmp_path):
    qdir, _ = quantized_dir
    copy = tmp_path / "q"
    shutil.copytree(qdir, copy)
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (copy / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(UserError, match="sha256"):
        load_quantized(copy)
    with pytest.raises(UserError, match="not a quantized folder"):
        load_quantized(trained_tiny.checkpoint_dir)
    code, _ = _cli(["quantize", "--checkpoint", str(trained_tiny.checkpoint_dir), "--calibration",
                    str(trained_tiny.calibration_path), "--out", str(qdir)])
    assert code == 1  # --out exists: a one-line error, not an overwrite


def test_folder_written_with_the_retired_attention_field_loads_for_bf16_and_is_refused_for_fp8(quantized_dir, tmp_path):
    qdir, _ = quantized_dir
    for attention in ("bf16", "fp8"):
        copy = tmp_path / attention
        shutil.copytree(qdir, copy)
        recipe = json.loads((copy / "recipe.json").read_text())
        recipe["recipe"]["attention"] = attention
        (copy / "recipe.json").write_text(json.dumps(recipe))
        if attention == "bf16":
            model, _, loaded = load_quantized(copy, verify=False)
            assert loaded["recipe"]["attention"] == "bf16" and isinstance(model.blocks[0].ffn.w1, FP8Linear)
        else:
            with pytest.raises(UserError, match="retired"):
                load_quantized(copy, verify=False)


def test_load_model_folder_takes_either_kind_of_folder(trained_tiny, quantized_dir, tmp_path):
    from onerec.quant.export import load_model_folder

    qdir, _ = quantized_dir
    model, table, recipe = load_model_folder(trained_tiny.checkpoint_dir, dtype=torch.bfloat16)
    assert recipe is None and model.token_embedding.weight.dtype == torch.bfloat16
    qmodel, qtable, recipe = load_model_folder(qdir)
    assert recipe["recipe"]["name"] == "fp8_dynamic" and isinstance(qmodel.blocks[0].ffn.w1, FP8Linear)
    assert np.array_equal(table, qtable)
    with pytest.raises(UserError, match="does not exist"):
        load_model_folder(tmp_path / "missing")


def test_quantize_folder_reuses_only_the_same_quantization(trained_tiny, quantized_dir):
    from onerec.quant.export import quantize_folder

    qdir, _ = quantized_dir
    args = (trained_tiny.checkpoint_dir, trained_tiny.calibration_path)
    same = quantize_folder(*args, "fp8_dynamic", qdir, exclude=["blocks.0.self_o"], reuse=True)
    assert same["reused"] is True
    with pytest.raises(UserError, match="exists"):  # another recipe: not reused, and not overwritten unasked
        quantize_folder(*args, "fp8_dynamic", qdir, reuse=True)
