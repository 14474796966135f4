"""The timed per-layer bf16/FP8 choice (onerec/engine/layer_choice.py, recipe option
layer_choice="timed"): the choice from given GEMM timings, its plumbing through quantize, the
quantize command and the pipeline's quantize step into recipe.json, and the served model then
running bf16 for the slower layers and FP8 for the others. The timer is faked here (no GPU);
tests/gpu/test_kernels.py times real GEMMs on CUDA."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from test_engine import _random_setup

from onerec.engine import layer_choice
from onerec.engine.convert import FUSED_INPUT
from onerec.engine.engine import Engine, EngineConfig
from onerec.engine.linear import FP8RowwiseMethod, UnquantizedMethod
from onerec.errors import UserError
from onerec.generate import beam_search
from onerec.kernels import QuantizedRows
from onerec.quant.fp8 import FP8Linear
from onerec.quant.recipes import make_recipe, quantize, recipe_from_dict, select_layers

UNFUSED_SPEEDUP, FUSED_SPEEDUP = 0.93, 1.2


class FakeTimer:
    """FP8 0.93x bf16 where the GEMM needs its own quantize pass, 1.2x where its input comes fused."""

    device_name = "Fake GPU"
    method = "fake"

    def __init__(self):
        self.calls = []

    def __call__(self, K, N, rows, fused_input):
        self.calls.append((K, N, rows, fused_input))
        return 1.0, 1.0 / (FUSED_SPEEDUP if fused_input else UNFUSED_SPEEDUP)


def _names(model):
    return select_layers(model, make_recipe("fp8_dynamic"))[0]


def test_choice_times_each_distinct_gemm_once_and_keeps_fp8_only_where_faster():
    model, _, _, _ = _random_setup("tiny")
    cfg, timer = model.cfg, FakeTimer()
    choice = layer_choice.choose_layers(model, _names(model), rows=512, timer=timer)
    layers = choice["layers"]
    assert choice["device"] == "Fake GPU" and choice["rows"] == 512 and choice["context_rows"] == cfg.context_len + 1
    assert set(layers) == set(_names(model))  # every selected layer of the dense model is an engine GEMM
    assert len(timer.calls) == len(set(timer.calls)) == 6  # 2 blocks x 7 layers + context.proj: 6 distinct GEMMs
    for b in range(cfg.n_layers):
        for name in ("cross_o", "self_o"):  # quantize_rows pass of their own: slower here
            entry = layers[f"blocks.{b}.{name}"]
            assert entry["choice"] == "bf16" and not entry["fused_input"] and entry["speedup"] == pytest.approx(0.93)
            assert layer_choice.excluded_reason(entry, 1.0) == "FP8 slower at 512 rows: 0.93x"
        for name in ("cross_q", "self_qkv", "ffn.w1", "ffn.w2", "ffn.w3"):
            assert layers[f"blocks.{b}.{name}"]["choice"] == "fp8" and layers[f"blocks.{b}.{name}"]["fused_input"]
        # w1 and w3: one GEMM of both outputs, one choice
        w13 = layers[f"blocks.{b}.ffn.w1"]
        assert w13 is layers[f"blocks.{b}.ffn.w3"] and w13["shape"] == [2 * cfg.ffn_hidden, cfg.d_model]
    assert layers["context.proj"]["rows"] == cfg.context_len + 1 and layers["context.proj"]["choice"] == "fp8"
    # a higher bar keeps everything bf16, each with its measured ratio
    strict = layer_choice.choose_layers(model, _names(model), rows=64, min_speedup=1.25, timer=FakeTimer())
    entry = strict["layers"]["blocks.0.cross_q"]
    assert entry["choice"] == "bf16" and entry["rows"] == 64
    assert layer_choice.excluded_reason(entry, 1.25) == "FP8 under 1.25x at 64 rows: 1.20x"


def test_moe_experts_are_not_timed_and_keep_the_recipes_selection():
    model, _, _, _ = _random_setup("tiny-moe")
    names = _names(model)
    timed = layer_choice.choose_layers(model, names, timer=FakeTimer())["layers"]
    assert "blocks.0.ffn.w1" in timed  # block 0 is dense
    assert not any(".experts." in n or ".shared." in n for n in timed)
    report = quantize(copy.deepcopy(model), make_recipe("fp8_dynamic", layer_choice="timed"), measure=False,
                      layer_timer=FakeTimer())
    assert "blocks.1.ffn.experts.0.w1" in report.quantized


def test_fused_input_names_the_layers_whose_fp8_input_the_engine_emits_before_them(monkeypatch):
    """engine.FUSED_INPUT (what the timing assumes) against what serving_model really wires."""
    model, index, sids, mask = _random_setup("tiny")
    engine = Engine(model, index, EngineConfig(beam_size=16, k=10, fp8=True))
    names = {id(m): n for n, m in engine.model.named_modules()}
    fused = {}
    apply = FP8RowwiseMethod.apply

    def record(self, layer, x):
        fused.setdefault(names[id(layer)], isinstance(x, QuantizedRows))
        return apply(self, layer, x)

    monkeypatch.setattr(FP8RowwiseMethod, "apply", record)
    engine.recommend(sids, mask)
    def model_names(n):  # the engine's w1|w3 GEMM computes the model's w1 and w3
        return [n.removesuffix("13") + "1", n.removesuffix("13") + "3"] if n.endswith("ffn.w13") else [n]

    got = {m: was_fused for n, was_fused in fused.items() for m in model_names(n)}
    assert len(got) == 1 + 7 * model.cfg.n_layers  # context.proj + 7 layers per block
    assert got == {n: layer_choice.fused_input(n) for n in got}
    assert {"cross_o", "self_o"}.isdisjoint(FUSED_INPUT)


def test_timed_quantization_keeps_slower_layers_bf16_and_the_engine_runs_them_so():
    model, index, sids, mask = _random_setup("tiny", seed=3)
    report = quantize(model, make_recipe("fp8_dynamic", layer_choice="timed"), measure=False,
                      layer_timer=FakeTimer())
    assert report.excluded["blocks.1.self_o"] == "FP8 slower at 512 rows: 0.93x"
    assert report.layer_choice["layers"]["blocks.1.self_o"]["bf16_ms"] == 1.0
    assert "blocks.1.self_o" not in report.quantized and "blocks.1.cross_q" in report.quantized
    assert type(model.blocks[1].self_o) is torch.nn.Linear and isinstance(model.blocks[1].cross_q, FP8Linear)
    engine = Engine(model, index, EngineConfig(beam_size=32, k=10))
    for block in engine.model.blocks:
        assert type(block.cross_o.method) is UnquantizedMethod and type(block.self_o.method) is UnquantizedMethod
        assert all(type(m.method) is FP8RowwiseMethod for m in (block.cross_q, block.self_qkv, block.ffn.w13,
                                                                 block.ffn.w2))
    got, want = engine.recommend(sids, mask), beam_search(model, sids, mask, index, beam_size=32, k=10)
    assert torch.equal(got.items, want.items)


def test_timed_choice_needs_a_cuda_gpu_and_says_so_in_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model, _, _, _ = _random_setup("tiny")
    with pytest.raises(UserError, match="needs|CUDA GPU") as err:
        quantize(model, make_recipe("fp8_dynamic", layer_choice="timed"), measure=False)
    assert "\n" not in str(err.value)


def test_recipe_option_is_validated_and_round_trips_and_old_recipes_load_as_all():
    recipe = make_recipe("fp8_dynamic", layer_choice="timed", layer_choice_rows=256, min_speedup=1.05)
    assert recipe_from_dict(recipe.to_dict()) == recipe
    old = make_recipe("fp8_dynamic").to_dict()
    for key in ("layer_choice", "layer_choice_rows", "min_speedup"):
        del old[key]  # a recipe.json written before the option
    assert recipe_from_dict(old).layer_choice == "all"
    with pytest.raises(UserError, match="layer_choice must be one of all, timed"):
        make_recipe("fp8_dynamic", layer_choice="fastest")
    with pytest.raises(UserError, match="no option"):
        make_recipe("fp8_block", layer_choice="timed")


def test_quantize_step_with_the_timed_choice_records_it_in_recipe_json(trained_tiny, tmp_path, monkeypatch):
    """The pipeline's quantize step with layer_choice=timed (the pods' GPU faked by the timer)."""
    from onerec.quant.export import load_quantized
    from tasks.config import load_config
    from tasks.requantize import Fetched, quantize_step

    monkeypatch.setattr(layer_choice, "default_timer", FakeTimer)
    monkeypatch.setenv("ONEREC_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("ONEREC_LAYER_CHOICE", "timed")
    cfg = load_config()
    assert cfg.layer_choice == "timed"
    work = tmp_path / "work"
    fetched = Fetched(checkpoint_id="c", checkpoint_uri="s3://b/c/", checkpoint_dir=str(trained_tiny.checkpoint_dir),
                      checkpoint_sha256="x", calibration_uri="s3://b/cal.parquet",
                      calibration_path=str(trained_tiny.calibration_path), calibration_sha256="y",
                      work_dir=str(work), report_dir=str(work / "reports"))
    result = quantize_step(cfg, fetched)
    recipe = json.loads((work / "quantized-fp8_dynamic" / "recipe.json").read_text())
    assert recipe["recipe"]["layer_choice"] == "timed" and recipe["recipe"]["layer_choice_rows"] == 512
    choice = recipe["layer_choice"]
    assert choice["device"] == "Fake GPU" and choice["rows"] == 512
    assert choice["layers"]["blocks.0.cross_o"]["choice"] == "bf16"
    assert recipe["excluded"]["blocks.0.cross_o"] == "FP8 slower at 512 rows: 0.93x"
    assert "blocks.0.cross_o" not in recipe["layers"] and "blocks.0.cross_q" in recipe["layers"]
    assert result["excluded_layers"] == len(recipe["excluded"])
    qmodel, _, _ = load_quantized(result["quantized_dir"])
    assert type(qmodel.blocks[0].cross_o) is torch.nn.Linear and qmodel.blocks[0].cross_o.weight.dtype == torch.bfloat16


def test_quantize_command_passes_the_layer_choice_to_fp8_dynamic_only():
    import argparse

    from onerec.quant.quantize_command import add_arguments, recipe_options

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    common = ["--checkpoint", "c", "--calibration", "t.parquet", "--out", "q"]
    assert recipe_options(parser.parse_args([*common, "--layer-choice", "timed"])) == {"layer_choice": "timed"}
    assert recipe_options(parser.parse_args(common)) == {}
    with pytest.raises(UserError, match="fp8_dynamic only"):
        recipe_options(parser.parse_args([*common, "--recipe", "fp8_block", "--layer-choice", "timed"]))
