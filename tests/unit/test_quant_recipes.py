"""Recipes, layer selection, calibration observers and quantize() on real (trained and random) models."""

import numpy as np
import pandas as pd
import pytest
import torch

from onerec.errors import UserError
from onerec.model import OneRecV2, OneRecV2Config
from onerec.quant.calibrate import ActivationObserver, Calibration, mse_clip_value
from onerec.quant.fp8 import E4M3_MAX, FP8Linear
from onerec.quant.recipes import RECIPES, make_recipe, quantize, recipe_from_dict, select_layers


def _random_requests(cfg: OneRecV2Config, n_items=200, n=48, seed=0):
    """A random tokenizer table and request table for an untrained model of `cfg`."""
    rng = np.random.default_rng(seed)
    V = cfg.codebook_size
    codes = rng.permutation(V**3)[:n_items]
    table = np.stack([codes // V**2, codes // V % V, codes % V], 1).astype(np.int32)
    requests = pd.DataFrame({
        "user_id": np.arange(n),
        "history": [rng.integers(0, n_items, rng.integers(1, cfg.context_len)).tolist() for _ in range(n)],
        "target": rng.integers(0, n_items, n),
    })
    return table, requests


@pytest.fixture(scope="module")
def calibrated_tiny(trained_tiny):
    from onerec.checkpoint import load_checkpoint

    model, table = load_checkpoint(trained_tiny.checkpoint_dir)
    return model, Calibration.from_path(trained_tiny.calibration_path, table, batch_size=128)


@pytest.mark.parametrize("recipe_name", ["fp8_dynamic", "fp8_static", "fp8_block"])
def test_every_recipe_quantizes_the_trained_tiny_model(trained_tiny, calibrated_tiny, recipe_name):
    import copy

    reference, calibration = calibrated_tiny
    model = copy.deepcopy(reference)
    report = quantize(model, make_recipe(recipe_name), calibration)
    fp8 = {n for n, m in model.named_modules() if isinstance(m, FP8Linear)}
    assert fp8 == set(report.quantized)
    # The defaults: attention projections, FFN and the context projection in FP8 ...
    expected = {f"blocks.{b}.{n}" for b in range(2) for n in
                ("cross_q", "cross_o", "self_qkv", "self_o", "ffn.w1", "ffn.w2", "ffn.w3")} | {"context.proj"}
    assert fp8 == expected
    # ... heads and the profile projection kept, each with its reason.
    assert set(report.excluded) == {"heads.0", "heads.1", "heads.2", "context.profile_proj"}
    assert all("high precision by default" in why for why in report.excluded.values())
    layer = model.get_submodule("blocks.0.ffn.w2")
    assert layer.activation == RECIPES[recipe_name].activation and layer.weight_granularity == RECIPES[recipe_name].weight
    stats = report.calibration["layers"]
    assert report.calibration["num_requests"] == len(calibration.requests)
    for name in expected:  # a healthy trained model: every layer well above the 20 dB flag
        assert stats[name]["sqnr_db"] > 22, (name, stats[name]["sqnr_db"])
        assert stats[name]["absmax"] > 0 and stats[name]["elements"] > 0
    if recipe_name == "fp8_static":
        for name in expected:
            assert stats[name]["input_scale"] == pytest.approx(stats[name]["clip_value"] / E4M3_MAX)
            assert 0 < stats[name]["clip_value"] <= stats[name]["absmax"]
    # The FP8 model still ranks like the original: teacher-forced logits stay close.
    batch = next(calibration.batches(reference))
    with torch.no_grad():
        ref = reference(batch.history_sids, batch.history_mask, batch.target_sids, batch.profile)
        out = model(batch.history_sids, batch.history_mask, batch.target_sids, batch.profile)
    assert ((out - ref).norm() / ref.norm()) < 0.1


def test_moe_experts_quantized_router_kept():
    torch.manual_seed(0)
    cfg = OneRecV2Config.from_preset("tiny-moe")
    model = OneRecV2(cfg).eval()
    table, requests = _random_requests(cfg)
    report = quantize(model, make_recipe("fp8_block"), Calibration(requests, table, batch_size=48))
    assert "blocks.1.ffn.experts.3.w2" in report.quantized and "blocks.2.ffn.shared.w1" in report.quantized
    assert "router" in report.excluded["blocks.1.ffn.router"]
    assert isinstance(model.blocks[1].ffn.router, torch.nn.Linear)
    assert model.blocks[1].ffn.experts[0].w1.weight_scale.shape == (1, 1)  # [64/128] x [64/128] blocks


def test_layers_the_fp8_gemm_cannot_take_are_reported_not_skipped():
    cfg = OneRecV2Config(d_model=40, n_layers=1, n_heads=2, codebook_size=16, context_len=8)
    model = OneRecV2(cfg)
    recipe = make_recipe("fp8_dynamic", exclude=["blocks.0.self_o"])
    selected, excluded = select_layers(model, recipe)
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(selected) | set(excluded) == linears  # every linear accounted for
    assert selected == []  # K = 40 everywhere
    assert "not a multiple of 16" in excluded["blocks.0.ffn.w1"] and "K=40" in excluded["blocks.0.ffn.w1"]
    assert excluded["blocks.0.self_o"] == "excluded by pattern 'blocks.0.self_o'"
    report = quantize(model, recipe)
    assert report.quantized == [] and report.excluded == excluded


def test_user_exclude_patterns_and_unknown_options():
    cfg = OneRecV2Config.from_preset("tiny")
    model = OneRecV2(cfg)
    report = quantize(model, make_recipe("fp8_dynamic", exclude=["blocks.1.*"]))
    assert not any(n.startswith("blocks.1.") for n in report.quantized)
    assert report.excluded["blocks.1.ffn.w2"] == "excluded by pattern 'blocks.1.*'"
    assert isinstance(model.blocks[0].ffn.w2, FP8Linear) and isinstance(model.blocks[1].ffn.w2, torch.nn.Linear)
    with pytest.raises(UserError, match="no option"):
        make_recipe("fp8_dynamic", observer="max")
    with pytest.raises(UserError, match="unknown recipe"):
        make_recipe("int4")
    with pytest.raises(UserError, match="needs calibration"):
        quantize(OneRecV2(cfg), "fp8_static", None)


def test_recipe_json_with_the_retired_attention_field_loads_for_bf16_and_is_refused_for_fp8():
    for name in RECIPES:
        written = {**make_recipe(name).to_dict(), "attention": "bf16"}  # a recipe.json from before
        assert recipe_from_dict(written).to_dict() == make_recipe(name).to_dict()
    with pytest.raises(UserError, match="FP8 attention .* was retired") as err:
        recipe_from_dict({**make_recipe("fp8_dynamic").to_dict(), "attention": "fp8"})
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="no option"):
        make_recipe("fp8_dynamic", attention="fp8")


def test_nan_in_calibration_activations_raises_naming_the_layer():
    cfg = OneRecV2Config.from_preset("tiny")
    model = OneRecV2(cfg).eval()
    with torch.no_grad():
        model.context.position_embedding.weight[3] = float("nan")  # poisons the context sequence
    table, requests = _random_requests(cfg)
    with pytest.raises(UserError, match=r"layer context\.proj: calibration activation"):
        quantize(model, make_recipe("fp8_dynamic"), Calibration(requests, table))


def test_static_observers_max_percentile_mse():
    torch.manual_seed(0)
    obs = ActivationObserver("layer")
    x = torch.randn(4000, 64)
    x[17, 5] = 200.0  # one outlier
    obs.update(x)
    clip_max = obs.clip_value("max")
    clip_pct = obs.clip_value("percentile", 99.99)
    clip_mse = obs.clip_value("mse")
    assert clip_max == pytest.approx(200.0)
    assert clip_pct < 10 < clip_max  # the percentile ignores the single outlier
    assert 0 < clip_mse < clip_max  # clipping the outlier lowers the error of everything else
    # MSE search: the chosen clip is no worse than the max or the percentile clip on the same data.
    sample = obs.sample

    def mse(clip):
        from onerec.quant.fp8 import quantize_per_tensor

        scale = torch.tensor(clip / E4M3_MAX)
        return float(((quantize_per_tensor(sample, scale).float() * scale - sample) ** 2).mean())

    assert mse(mse_clip_value(sample, clip_max)) <= min(mse(clip_max), mse(clip_pct)) + 1e-12
    stats = obs.stats()
    assert stats["absmax"] == pytest.approx(200.0)
    assert stats["variance"] == pytest.approx(float(x.double().var(unbiased=False)), rel=1e-9)
    assert stats["kurtosis"] > 3  # the outlier makes the tails heavier than a normal's


def test_recipe_dict_is_versioned_and_reads_the_unversioned_form():
    from onerec.quant.recipes import RECIPE_VERSION, recipe_from_dict

    recipe = make_recipe("fp8_static", exclude=["blocks.0.*"], observer="max")
    d = recipe.to_dict()
    assert d["version"] == RECIPE_VERSION == 1
    assert recipe_from_dict(d) == recipe
    unversioned = {k: v for k, v in d.items() if k != "version"}  # recipe.json before versions
    assert recipe_from_dict(unversioned) == recipe
    with pytest.raises(UserError, match="recipe version 2"):
        recipe_from_dict({**d, "version": 2})
    with pytest.raises(UserError, match="no field"):
        recipe_from_dict({**d, "block_size": 64})
