"""The fused MoE's launch configs (onerec/kernels/triton_fused_moe.py) on CPU: the per-device table
with its nearest token count, the heuristic, the fit to Hopper's shared memory at every token count
(and the fitted kernels compiled for sm_90 staying within it), and the tuner (bench/tune_fused_moe.py)
writing a table whose configs the kernels then run with, through Triton's interpreter."""

from __future__ import annotations

import json

import pytest
import torch
from triton_interpreter import compile_for_hopper, interpret_triton, requires_triton

from bench import tune_fused_moe as tune
from onerec import kernels
from onerec.kernels import Kernel
from onerec.kernels import triton_fused_moe as tmk

LIMIT = tmk.HOPPER_SHARED_MEMORY
H200 = "NVIDIA H200"
# 1..4096 each, then odd steps to 65536, and every power of two with its neighbours
TOKEN_COUNTS = sorted({*range(1, 4097), *range(4097, 65537, 37), *(2**i + d for i in range(17) for d in (-1, 0, 1))}
                      - {0})


@pytest.fixture(scope="module")
def moe_4b():
    """moe-4b's expert shapes (d_model 1408, 53 routed + 1 shared of hidden 1408, top-3), no data."""
    return {fmt: tune.meta_weights("moe-4b", fp8=fmt == "fp8") for fmt in tune.FORMATS}


@pytest.fixture
def config_dir(tmp_path, monkeypatch):
    """An empty table folder in place of onerec/kernels/configs."""
    monkeypatch.setattr(tmk, "CONFIG_DIR", tmp_path)
    tmk.load_table.cache_clear()
    yield tmp_path
    tmk.load_table.cache_clear()


def kernel(block_n, block_k, warps, stages):
    return dict(BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)


def write_table(folder, name, shape, by_format):
    configs = {shape: {fmt: {str(t): cfg for t, cfg in by_tokens.items()} for fmt, by_tokens in by_format.items()}}
    (folder / f"fused_moe_{tmk.device_slug(name)}.json").write_text(json.dumps({"device": name, "configs": configs}))


# Oversized on purpose (the largest tiles and deepest pipelines a table could hold): the fit must
# bring each one within the limit.
OVERSIZED = {
    "bf16": {512: {"BLOCK_M": 32, "gate_up": kernel(128, 256, 4, 5), "down": kernel(256, 128, 4, 5)},
             4096: {"BLOCK_M": 128, "gate_up": kernel(128, 128, 8, 4), "down": kernel(128, 128, 8, 4)},
             49152: {"BLOCK_M": 128, "gate_up": kernel(256, 128, 8, 3), "down": kernel(128, 256, 8, 5)}},
    "fp8": {512: {"BLOCK_M": 16, "gate_up": kernel(128, 128, 4, 6), "down": kernel(128, 128, 4, 6)},
            4096: {"BLOCK_M": 128, "gate_up": kernel(128, 128, 8, 5), "down": kernel(128, 128, 8, 5)}},
}


def assert_fits(cfg, w):
    for k in tmk.KERNELS:
        assert tmk.shared_memory_bytes(k, cfg["BLOCK_M"], cfg[k], tmk.element_bytes(w)) <= LIMIT, (k, cfg)
        if w.fp8:
            assert cfg[k]["BLOCK_N"] == cfg[k]["BLOCK_K"] == 128, cfg


def test_the_heuristic_that_failed_on_the_h200_is_fitted_at_every_token_count(moe_4b):
    """At 4096+ tokens the bf16 heuristic is BLOCK_M 128 with 128 x 128 tiles in 3 stages: 294912 bytes
    in gate_up, the H200's "out of resource" (limit 232448); the fit brings it and every other count within."""
    bf16 = moe_4b["bf16"]
    raw = tmk.default_config(4096 * 4, 54, fp8=False)
    assert tmk.shared_memory_bytes("gate_up", raw["BLOCK_M"], raw["gate_up"], 2) == 294912 + tmk.SHARED_MEMORY_MARGIN
    fitted = tmk.choose_config(4096, bf16, None, LIMIT)
    assert fitted["BLOCK_M"] == 128 and fitted["gate_up"]["num_stages"] == 2  # fewer stages first
    for w in moe_4b.values():
        for tokens in TOKEN_COUNTS:
            assert_fits(tmk.choose_config(tokens, w, None, LIMIT), w)


def test_table_configs_nearest_token_count_fitted_at_every_token_count(moe_4b, config_dir):
    shape = tmk.shape_key(moe_4b["bf16"])
    assert shape == "experts=54,slots=4,d_model=1408,hidden=1408"
    write_table(config_dir, H200, shape, OVERSIZED)
    for fmt, w in moe_4b.items():
        keys = sorted(OVERSIZED[fmt])
        for tokens in TOKEN_COUNTS:
            cfg = tmk.choose_config(tokens, w, H200, LIMIT)
            nearest = min(keys, key=lambda t: (abs(t - tokens), t))
            assert cfg["BLOCK_M"] == OVERSIZED[fmt][nearest]["BLOCK_M"], tokens
            assert_fits(cfg, w)
    # the table's values are kept where they fit; stages go first, then (bf16) BLOCK_K, then BLOCK_N
    bf16 = moe_4b["bf16"]
    assert tmk.choose_config(2303, bf16, H200, LIMIT)["BLOCK_M"] == 32  # nearer 512 than 4096
    assert tmk.choose_config(2305, bf16, H200, LIMIT)["BLOCK_M"] == 128
    big = tmk.choose_config(49152, bf16, H200, LIMIT)
    assert big["gate_up"] == kernel(256, 64, 8, 2) and big["down"] == kernel(128, 128, 8, 2)
    assert tmk.choose_config(4096, moe_4b["fp8"], H200, LIMIT)["gate_up"] == kernel(128, 128, 8, 4)
    # a caller's values are fitted too
    assert_fits(tmk.choose_config(512, bf16, H200, LIMIT, dict(BLOCK_M=64, num_stages=6, BLOCK_K=256)), bf16)


def test_without_a_table_entry_the_heuristic_is_used(moe_4b, config_dir):
    bf16, fp8 = moe_4b["bf16"], moe_4b["fp8"]
    write_table(config_dir, H200, tmk.shape_key(bf16), {"bf16": OVERSIZED["bf16"]})
    heuristic = tmk.choose_config(700, fp8, None, LIMIT)
    assert tmk.choose_config(700, fp8, H200, LIMIT) == heuristic  # no fp8 entries
    assert tmk.choose_config(700, fp8, "NVIDIA B200", LIMIT) == heuristic  # no table for the device
    assert tmk.choose_config(700, bf16, H200, LIMIT) != tmk.choose_config(700, bf16, None, LIMIT)
    other_shape = tune.meta_weights("tiny-moe", fp8=False)
    assert tmk.choose_config(700, other_shape, H200, LIMIT) == tmk.choose_config(700, other_shape, None, LIMIT)


def test_a_malformed_table_is_a_one_line_error(moe_4b, config_dir):
    write_table(config_dir, H200, tmk.shape_key(moe_4b["bf16"]), {"bf16": {512: {"BLOCK_M": "64"}}})
    with pytest.raises(ValueError, match=r"fused_moe_nvidia_h200\.json: not a fused MoE config table") as err:
        tmk.choose_config(512, moe_4b["bf16"], H200, LIMIT)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="FP8 block kernels need BLOCK_N == BLOCK_K == 128"):
        tmk.choose_config(512, moe_4b["fp8"], None, LIMIT, dict(BLOCK_K=64))


@requires_triton
def test_fitted_configs_compile_for_hopper_within_the_shared_memory_estimate(moe_4b):
    """The estimate bounds what Triton allocates: the largest fitted tiles of each kernel and format,
    compiled for sm_90 with moe-4b's 16-divisible sizes, use no more than estimated (and the limit)."""
    import triton.language as tl

    gate_up, down = tmk._kernels()[:2]
    cases = [("bf16", "gate_up", 128, kernel(128, 128, 8, 4)), ("bf16", "down", 128, kernel(128, 128, 8, 4)),
             ("fp8", "gate_up", 128, kernel(128, 128, 8, 5))]
    for fmt, name, block_m, raw in cases:
        w = moe_4b[fmt]
        cfg = tmk.fit_shared_memory({"BLOCK_M": block_m, "gate_up": raw, "down": raw}, w.fp8, tmk.element_bytes(w),
                                    LIMIT)[name]
        assert cfg != raw  # the fit reduced it
        e = "fp8e4nv" if w.fp8 else "bf16"
        consts = dict(FP8=w.fp8, IEEE=False, BLOCK_M=block_m, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"])
        options = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        if name == "gate_up":
            compiled = compile_for_hopper(
                gate_up, dict(x_ptr=e, xs_ptr="fp32", w1_ptr=e, w3_ptr=e, w1s_ptr="fp32", w3s_ptr="fp32", h_ptr=e,
                              hs_ptr="fp32", token_ptr="i32", tile_expert_ptr="i32", tile_row_ptr="i32",
                              offsets_ptr="i32"),
                (), dict(consts, DTYPE=tl.bfloat16, FP8_MAX=448.0, SCALE_MIN=1e-12), divisible=("K", "I"), **options)
        else:
            compiled = compile_for_hopper(
                down, dict(h_ptr=e, hs_ptr="fp32", w2_ptr=e, w2s_ptr="fp32", y_ptr="bf16", gate_ptr="fp32",
                           tile_expert_ptr="i32", tile_row_ptr="i32", offsets_ptr="i32"),
                (), consts, divisible=("D", "I"), **options)
        estimate = tmk.shared_memory_bytes(name, block_m, cfg, tmk.element_bytes(w))
        # pipelined: the tiles of more than one stage sit in shared memory
        assert estimate - tmk.SHARED_MEMORY_MARGIN >= compiled.metadata.shared > estimate / cfg["num_stages"], (
            fmt, name, cfg, compiled.metadata.shared)


def test_tuner_dry_run_lists_candidates_that_fit(capsys):
    tune.dry_run("moe-4b", list(tune.TOKENS), tune.SPACE)
    out = capsys.readouterr().out.splitlines()
    assert len(out) == len(tune.FORMATS) * len(tune.TOKENS) + 1
    assert out[0].startswith("bf16 512 tokens: BM32 gate_up ")  # the heuristic's BLOCK_M first
    assert "BM16" not in out[5] and "BM128 gate_up" in out[5]  # 49152 tokens: 3641 rows per expert
    assert out[-1].endswith(f"every candidate within {LIMIT} bytes of shared memory")


@pytest.fixture
def interpreted(monkeypatch):
    interpret_triton(monkeypatch, tmk._kernels)
    yield
    tmk._kernels.cache_clear()


# a small space: the interpreter runs every candidate
SMALL_SPACE = {"BLOCK_M": (16, 32), "bf16": {"BLOCK_N_K": ((32, 32), (64, 32)), "num_stages": (2,)},
               "fp8": {"BLOCK_N_K": ((128, 128),), "num_stages": (2,)}, "num_warps": {16: (4,), 32: (4,)}}


@requires_triton
def test_tuned_table_is_what_the_kernels_run_with_interpreted(interpreted, config_dir):
    """bench/tune_fused_moe.py's logic on tiny-moe (CPU, one timed call per candidate): its table, loaded
    from the config folder, gives the kernels their configs, and they equal the torch reference."""
    weights = tune.random_weights("tiny-moe", "cpu")
    results = tune.tune(weights, [40], budget_s=600, limit=LIMIT, space=SMALL_SPACE)
    shape = tmk.shape_key(weights["bf16"])
    meta = {"command": "test", "date": "2026-12-04", "triton": "3.6.0"}
    table = tune.table("cpu", shape, results, meta)
    tmk.table_path("cpu").write_text(json.dumps(table))
    tmk.load_table.cache_clear()  # the tuner's own runs found no table
    torch.manual_seed(3)
    x = torch.randn(37, weights["bf16"].w1.shape[2], dtype=torch.bfloat16)
    for fmt, w in weights.items():
        for r in results[fmt].values():
            assert r["rel_error_vs_reference"] < 1e-3 and not r["skipped_block_m"]
            timed = {int(bm) for bm in r["timings"]}
            assert timed == {16, 32} and r["chosen"]["BLOCK_M"] in timed
            assert r["chosen"]["gate_up"] in [{k: t[k] for k in tmk.KERNEL_KEYS}
                                              for t in r["timings"][str(r["chosen"]["BLOCK_M"])]["gate_up"]]
        assert set(table["configs"][shape][fmt]) == {"40"}
        chosen = results[fmt][40]["chosen"]  # 37 tokens: the nearest tuned count is 40
        assert tmk.moe_config(37, w, x.device) == chosen != tmk.choose_config(37, w, None, LIMIT)  # not the heuristic
        with torch.no_grad():
            assert (kernels.moe(x, w, Kernel.TRITON).float() - kernels.moe(x, w, Kernel.TORCH).float()).norm() < (
                1e-3 * kernels.moe(x, w, Kernel.TORCH).float().norm())
