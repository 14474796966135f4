"""The fused MoE op (onerec/kernels): torch reference against the model, the Triton kernels against
the reference (on CPU through Triton's interpreter; triton is in the dev extra), and the op
through the engine against the plain beam search.

Errors are relative: ||out - ref|| / ||ref|| (fp32 far under 1e-3, bf16 roundings 1e-3..1e-2).
"""

from __future__ import annotations

import pytest
import torch
from test_engine import _random_setup
from triton_interpreter import compile_for_hopper, interpret_triton, requires_triton

from onerec import kernels
from onerec.engine.engine import Engine, EngineConfig
from onerec.engine.layers import FusedMoE, stack_experts
from onerec.generate import beam_search
from onerec.kernels import Kernel
from onerec.kernels import fused_moe as mk
from onerec.kernels import triton_fused_moe as tmk
from onerec.model import MoE, OneRecV2, OneRecV2Config
from onerec.quant.fp8 import FP8Linear
from onerec.quant.recipes import quantize


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any()
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _tiny_moe(dtype, seed=0):
    torch.manual_seed(seed)
    model = OneRecV2(OneRecV2Config.from_preset("tiny-moe")).eval()
    # spread the router so every expert gets tokens and the top-k is not a near-tie
    for block in model.blocks[1:]:
        torch.nn.init.normal_(block.ffn.router.weight, std=0.5)
    return model.to(dtype)


@pytest.fixture
def interpreted(monkeypatch):
    interpret_triton(monkeypatch, tmk._kernels)
    yield
    tmk._kernels.cache_clear()


# ---------------------------------------------------------------------------------------------
# MoE


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_moe_reference_equals_the_model_moe(dtype, tol):
    model = _tiny_moe(dtype)
    x = torch.randn(3, 41, 64, dtype=dtype)
    with torch.no_grad():
        for block in model.blocks[1:]:
            weights = stack_experts(block.ffn)
            assert weights.shared_folded and weights.w1.shape[0] == 5 and not weights.fp8
            assert rel(kernels.moe(x, weights, Kernel.TORCH), block.ffn(x)) < tol


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2)])
def test_moe_fp8_block_reference_equals_the_quantized_model_moe(dtype, tol):
    """fp8_block experts (1x128 activations, 128x128 weights): the module's dequantized-weight math."""
    model = _tiny_moe(dtype)
    x = torch.randn(2, 57, 64, dtype=dtype)
    with torch.no_grad():
        high = model.blocks[1].ffn(x)
        quantize(model, "fp8_block")
        moe = model.blocks[1].ffn
        assert isinstance(moe.experts[0].w1, FP8Linear) and isinstance(moe.shared.w2, FP8Linear)
        weights = stack_experts(moe)
        assert weights.fp8 and weights.shared_folded
        out = kernels.moe(x, weights, Kernel.TORCH)
        assert rel(out, moe(x)) < tol
        assert 1e-3 < rel(out, high) < 0.15  # FP8 noise is there, and small


def test_moe_weights_quantized_on_the_fly_equal_the_fp8_block_recipe():
    model = _tiny_moe(torch.bfloat16)
    on_the_fly = stack_experts(model.blocks[2].ffn, fp8=True)
    quantize(model, "fp8_block")
    recipe = stack_experts(model.blocks[2].ffn)
    for name in ("w1", "w2", "w3", "w1_scale", "w2_scale", "w3_scale"):
        assert torch.equal(getattr(on_the_fly, name).float(), getattr(recipe, name).float()), name


def test_moe_experts_in_a_format_the_grouped_gemm_cannot_take_stay_on_the_module():
    model = _tiny_moe(torch.bfloat16)
    quantize(model, "fp8_dynamic")  # per-channel FP8 experts
    assert stack_experts(model.blocks[1].ffn) is None


@pytest.mark.parametrize("block_m", [16, 32])
def test_route_plan_tiles_cover_each_pair_once_and_never_straddle_experts(block_m):
    torch.manual_seed(1)
    N, k, E = 50, 3, 8
    gates, experts = mk.route(torch.randn(N, 16), torch.randn(E - 1, 16), k)
    plan = mk.plan_routes(gates, experts, E, shared=True, block_m=block_m)
    M = N * (k + 1)
    assert plan.tile_expert.shape == ((M + block_m - 1) // block_m + E,)  # static: no data-dependent size
    offsets = plan.offsets.long()
    covered = torch.zeros(M, dtype=torch.long)
    for t, e in enumerate(plan.tile_expert.tolist()):
        if e == E:
            continue
        lo = plan.tile_row[t].item()
        hi = min(lo + block_m, offsets[e + 1].item())
        assert offsets[e] <= lo < offsets[e + 1]
        covered[lo:hi] += 1
    assert torch.equal(covered, torch.ones(M, dtype=torch.long))
    # pair (token, slot) sits at sorted row inverse[token, slot] of its expert, with its gate
    routed = torch.cat([experts, torch.full((N, 1), E - 1)], 1)
    rows = plan.inverse
    assert torch.equal(plan.token[rows].long(), torch.arange(N)[:, None].expand(N, k + 1))
    expert_of_row = torch.searchsorted(offsets[1:], rows, right=True)
    assert torch.equal(expert_of_row, routed)
    assert torch.allclose(plan.gate[rows[:, :k]], gates) and torch.all(plan.gate[rows[:, k]] == 1)


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fp8", [False, True])
def test_moe_triton_kernels_equal_the_reference_interpreted(interpreted, dtype, fp8):
    model = _tiny_moe(dtype, seed=2)
    weights = stack_experts(model.blocks[1].ffn, fp8=fp8)
    x = torch.randn(37, 64, dtype=dtype)
    ref = kernels.moe(x, weights, Kernel.TORCH)
    for block_m in (16, 32):  # 16: many tiles per expert; 32: partial tiles
        out = kernels.moe(x, weights, Kernel.TRITON, config=dict(BLOCK_M=block_m))
        assert rel(out, ref) < (1e-5 if dtype == torch.float32 else 1e-3)


@requires_triton
@pytest.mark.parametrize("tokens, top_k, experts, shared, block_m", [(50, 3, 8, True, 16), (300, 2, 5, False, 32),
                                                                    (700, 3, 54, True, 64)])
def test_route_plan_kernels_equal_the_torch_plan_interpreted(interpreted, tokens, top_k, experts, shared, block_m):
    torch.manual_seed(tokens)
    gates, chosen = mk.route(torch.randn(tokens, 16), torch.randn(experts - shared, 16), top_k)
    ref = mk.plan_routes(gates, chosen, experts, shared, block_m)
    out = tmk.plan_routes(gates, chosen, experts, shared, block_m, block=128)  # several blocks
    for name in ("token", "gate", "inverse", "offsets", "tile_expert"):
        assert torch.equal(getattr(out, name), getattr(ref, name).to(getattr(out, name).dtype)), name
    used = ref.tile_expert < experts  # unused tiles' first rows are never read
    assert torch.equal(out.tile_row[used], ref.tile_row[used])


@requires_triton
def test_block_quantization_kernel_equals_quantize_blockwise_interpreted(interpreted):
    from onerec.quant.fp8 import quantize_blockwise

    x = torch.randn(9, 300) * torch.logspace(-3, 2, 300)
    q, s = tmk.quantize_blocks(x)
    q_ref, s_ref = quantize_blockwise(x, (1, 128))
    assert torch.equal(s, s_ref) and torch.equal(q.float(), q_ref.float())


# ---------------------------------------------------------------------------------------------
# Compiled for Hopper on CPU (Triton's own ptxas, no GPU): the FP8 products are FP8 tensor-core ops


def _compile_for_hopper(kernel, pointers: dict, scalars_fp32: tuple, constexprs: dict, **options) -> str:
    """PTX of `kernel` compiled for sm_90; pointers {arg: Triton type}, other non-constexpr args i32."""
    return compile_for_hopper(kernel, pointers, scalars_fp32, constexprs, **options).asm["ptx"]


FP8_WGMMA = "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3"


@requires_triton
def test_fp8_moe_kernels_compile_to_hopper_fp8_wgmma():
    import triton.language as tl

    gate_up, down = tmk._kernels()[:2]
    f8, f32 = "fp8e4nv", "fp32"
    fp8_consts = dict(FP8=True, IEEE=False, BLOCK_M=64, BLOCK_N=128, BLOCK_K=128)
    ptx = _compile_for_hopper(
        gate_up, dict(x_ptr=f8, xs_ptr=f32, w1_ptr=f8, w3_ptr=f8, w1s_ptr=f32, w3s_ptr=f32, h_ptr=f8, hs_ptr=f32,
                      token_ptr="i32", tile_expert_ptr="i32", tile_row_ptr="i32", offsets_ptr="i32"),
        (), dict(fp8_consts, DTYPE=tl.bfloat16, FP8_MAX=448.0, SCALE_MIN=1e-12), num_warps=4, num_stages=3,
    )
    assert FP8_WGMMA in ptx
    ptx = _compile_for_hopper(
        down, dict(h_ptr=f8, hs_ptr=f32, w2_ptr=f8, w2s_ptr=f32, y_ptr="bf16", gate_ptr=f32,
                   tile_expert_ptr="i32", tile_row_ptr="i32", offsets_ptr="i32"),
        (), fp8_consts, num_warps=4, num_stages=3,
    )
    assert FP8_WGMMA in ptx
    # the routing plan's kernels compile too (scans over blocks and experts)
    histogram, scan, scatter = tmk._kernels()[4:]
    i32 = "i32"
    plan = dict(K_TOP=3, SLOTS=4, BLOCK=256, E_PAD=64)
    assert _compile_for_hopper(histogram, dict(experts_ptr="i64", hist_ptr=i32), (), plan)
    assert _compile_for_hopper(scan, dict(hist_ptr=i32, base_ptr=i32, offsets_ptr=i32, tile_expert_ptr=i32,
                                          tile_row_ptr=i32), (), dict(BLOCK_M=64, NB_PAD=256, E_PAD=64, TILE_CHUNK=128),
                               num_warps=8)
    assert _compile_for_hopper(scatter, dict(experts_ptr="i64", gates_ptr=f32, base_ptr=i32, token_ptr=i32,
                                             gate_ptr=f32, inverse_ptr="i64"), (), plan)


# ---------------------------------------------------------------------------------------------
# Through the engine (opt-in: EngineConfig.moe_kernel)


def _requests(cfg, users=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    sids = torch.randint(0, cfg.codebook_size, (users, 20, 3), generator=g)
    mask = torch.ones(users, 20, dtype=torch.bool)
    mask[1::2, :7] = False  # every second history left-padded
    return sids, mask


@pytest.mark.parametrize("moe_kernel", ["torch", pytest.param("triton", marks=requires_triton)])
def test_engine_with_the_fused_moe_equals_plain_beam_search(request, moe_kernel):
    if moe_kernel == "triton":
        request.getfixturevalue("interpreted")
    model, index, _, _ = _random_setup("tiny-moe")
    sids, mask = _requests(model.cfg)
    want = beam_search(model, sids, mask, index, beam_size=16, k=10)
    engine = Engine(model, index, EngineConfig(beam_size=16, k=10, moe_kernel=moe_kernel))
    fused = [b.ffn for b in engine.model.blocks[1:]]
    assert all(isinstance(m, FusedMoE) and m.weights is not None and m.kernel is Kernel(moe_kernel) for m in fused)
    assert type(model.blocks[1].ffn) is MoE  # the caller's model is left as it is
    assert engine.has_moe == (moe_kernel == "torch")  # only the Triton path is free of host syncs
    got = engine.recommend(sids, mask)
    assert torch.equal(got.items, want.items)
    torch.testing.assert_close(got.scores, want.scores, rtol=1e-4, atol=1e-4)
    if moe_kernel == "triton":  # FP8 experts (128x128 blocks, quantized on the fly): kernel = reference
        fp8 = [Engine(model, index, EngineConfig(beam_size=16, k=10, fp8=True, moe_kernel=kernel)).recommend(sids, mask)
               for kernel in ("torch", "triton")]
        assert torch.equal(fp8[0].items, fp8[1].items)
        # another FP32 summation order can move a hidden value across an E4M3 rounding boundary
        torch.testing.assert_close(fp8[0].scores, fp8[1].scores, rtol=2e-3, atol=1e-3)


def test_engine_refuses_unknown_moe_kernel():
    model, index, _, _ = _random_setup("tiny-moe")
    with pytest.raises(ValueError, match="unknown moe_kernel 'cuda'"):
        Engine(model, index, EngineConfig(moe_kernel="cuda"))
